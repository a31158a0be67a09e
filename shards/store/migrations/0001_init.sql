-- Users, records by collection, cursors and dead letters.
CREATE TABLE users (
    did              text PRIMARY KEY,
    handle           text NOT NULL,
    incomplete       boolean NOT NULL DEFAULT true,
    handle_verified  boolean NOT NULL DEFAULT false,
    pds              text,
    active           boolean NOT NULL DEFAULT true,
    status           text,
    display_name     text,
    description      text,
    avatar_cid       text,
    banner_cid       text,
    refresh_attempts integer NOT NULL DEFAULT 0,
    refresh_after    timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX users_incomplete ON users (refresh_after) WHERE incomplete;

CREATE TABLE posts (
    uri              text PRIMARY KEY,
    cid              text,
    author_did       text NOT NULL,
    text             text,
    reply_parent_uri text,
    reply_root_uri   text,
    langs            text[],
    embed            jsonb,
    created_at       timestamptz
);
CREATE INDEX posts_author ON posts (author_did);

CREATE TABLE likes (
    uri         text PRIMARY KEY,
    cid         text,
    author_did  text NOT NULL,
    subject_uri text,
    subject_cid text,
    created_at  timestamptz
);
CREATE INDEX likes_author ON likes (author_did);

CREATE TABLE reposts (LIKE likes INCLUDING ALL);

CREATE TABLE follows (
    uri         text PRIMARY KEY,
    cid         text,
    author_did  text NOT NULL,
    subject_did text,
    created_at  timestamptz
);
CREATE INDEX follows_author ON follows (author_did);

CREATE TABLE blocks (LIKE follows INCLUDING ALL);

CREATE TABLE records (
    uri        text PRIMARY KEY,
    cid        text,
    author_did text NOT NULL,
    collection text NOT NULL,
    record     jsonb
);
CREATE INDEX records_author ON records (author_did);

CREATE TABLE cursors (
    name       text PRIMARY KEY,
    cursor     bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE dead_letters (
    id         bigserial PRIMARY KEY,
    source     text NOT NULL,
    position   bigint NOT NULL,
    raw        bytea NOT NULL,
    error      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    raw_sha256 bytea GENERATED ALWAYS AS (sha256(raw)) STORED,
    UNIQUE (source, position, raw_sha256)
);
