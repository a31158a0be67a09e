-- Exact counts: post_stats and user_stats hold what the record tables hold, at every commit.
--
-- They follow what each statement really changed, never what an event asked for: statement
-- triggers read their transition tables (a create that was there already, or a delete of
-- something absent, changes no row and so no count; an update that changes a subject moves it)
-- and add the deltas to those of their transaction. A deferred trigger sums them at commit and
-- applies them, one row per key in byte order: a transaction locks counts rows only from its
-- commit on, and every transaction locks them in the same order, so none waits on another in a
-- cycle. A transaction that rolls back (and is retried) takes its deltas with it. A row whose
-- counts all come back to zero is deleted.
--
-- The indexes that go with these reads (likes and reposts by subject_uri, follows by subject_did,
-- posts by reply_parent_uri) are built CONCURRENTLY by shards/store/counts.py, which also fills
-- the counts of records written before this migration, in batches (table stats_fill).

CREATE TABLE post_stats (
    uri     text PRIMARY KEY,
    likes   bigint NOT NULL DEFAULT 0,
    reposts bigint NOT NULL DEFAULT 0,
    replies bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 90);  -- room on the page: an increment is a HOT update, no index entry

CREATE TABLE user_stats (
    did       text PRIMARY KEY,
    followers bigint NOT NULL DEFAULT 0,
    follows   bigint NOT NULL DEFAULT 0,
    posts     bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 90);

-- What is left of filling a counts table from the records: keys up to `after` (in the
-- database's order of text) are exact; NULL is the start. `done` once every key is.
CREATE TABLE stats_fill (
    name  text PRIMARY KEY,
    after text,
    done  boolean NOT NULL DEFAULT false
);

-- One row for each transaction with deltas to apply: its deferred trigger applies them at commit.
-- Unlogged: a row lives only inside its transaction.
CREATE UNLOGGED TABLE stats_commit (xid xid8 PRIMARY KEY);

-- Adds one statement's deltas to those of the open transaction: `keys` (a text[] literal) each
-- move column `code` of `target` by one, up for a positive code, down for a negative one
-- (posts: 1 likes, 2 reposts, 3 replies; users: 1 followers, 2 follows, 3 posts). They are kept
-- in settings local to the transaction, the elements of a text[] and of an int[] side by side
-- (pipeline_stats.posts_keys and .posts_codes, .users_keys and .users_codes; the keys of
-- negative codes again in .posts_removed and .users_removed): a rolled back savepoint or
-- transaction takes them back with it, and they cost no table (a temporary table would make
-- every commit of the session empty the session's temporary tables).
-- The functions plan as PostgreSQL does by default: the pool's sessions plan every statement
-- anew (plan_cache_mode = force_custom_plan), which would plan these at every call.
CREATE FUNCTION stats_add(target text, code int, keys text, n bigint) RETURNS void
LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
DECLARE
    name text := 'pipeline_stats.' || target;
    was text := nullif(current_setting(name || '_keys', true), '');
BEGIN
    IF keys IS NULL THEN
        RETURN;
    END IF;
    PERFORM set_config(name || '_keys', concat_ws(',', was, substr(keys, 2, length(keys) - 2)),
                       true),
            set_config(name || '_codes',
                       concat_ws(',', nullif(current_setting(name || '_codes', true), ''),
                                 rtrim(repeat(code || ',', n::int), ',')), true);
    IF code < 0 THEN
        PERFORM set_config(name || '_removed',
                           concat_ws(',', nullif(current_setting(name || '_removed', true), ''),
                                     substr(keys, 2, length(keys) - 2)), true);
    END IF;
    IF was IS NULL THEN
        INSERT INTO stats_commit VALUES (pg_current_xact_id()) ON CONFLICT DO NOTHING;
    END IF;
END $$;

-- The deltas added so far to `target`, one row each (not summed) as (key, a, b, c).
CREATE FUNCTION stats_deltas(target text) RETURNS TABLE (key text, a int, b int, c int)
LANGUAGE sql STABLE AS $$
    SELECT k, (abs(d) = 1)::int * sign(d)::int, (abs(d) = 2)::int * sign(d)::int,
           (abs(d) = 3)::int * sign(d)::int
    FROM unnest(('{' || current_setting('pipeline_stats.' || target || '_keys', true) || '}')::text[],
                ('{' || current_setting('pipeline_stats.' || target || '_codes', true) || '}')::int[])
         AS t (k, d)
$$;

-- At commit: the deltas summed per key and applied in byte order of the key, posts before
-- users; the rows whose counts came down to zero then go (only rows this transaction wrote, and
-- so holds already: no lock out of order).
CREATE FUNCTION stats_apply() RETURNS trigger LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
BEGIN
    DELETE FROM stats_commit WHERE xid = pg_current_xact_id();  -- later changes queue anew
    IF current_setting('pipeline_stats.posts_keys', true) <> '' THEN
        INSERT INTO post_stats AS s (uri, likes, reposts, replies)
        SELECT key COLLATE "C", sum(a), sum(b), sum(c) FROM stats_deltas('posts')
        GROUP BY 1 HAVING sum(a) <> 0 OR sum(b) <> 0 OR sum(c) <> 0 ORDER BY 1
        ON CONFLICT (uri) DO UPDATE SET likes = s.likes + EXCLUDED.likes,
            reposts = s.reposts + EXCLUDED.reposts, replies = s.replies + EXCLUDED.replies;
    END IF;
    IF current_setting('pipeline_stats.posts_removed', true) <> '' THEN
        DELETE FROM post_stats WHERE likes = 0 AND reposts = 0 AND replies = 0
            AND xmin = pg_current_xact_id()::xid AND uri = ANY(
                ('{' || current_setting('pipeline_stats.posts_removed') || '}')::text[]);
    END IF;
    IF current_setting('pipeline_stats.users_keys', true) <> '' THEN
        INSERT INTO user_stats AS s (did, followers, follows, posts)
        SELECT key COLLATE "C", sum(a), sum(b), sum(c) FROM stats_deltas('users')
        GROUP BY 1 HAVING sum(a) <> 0 OR sum(b) <> 0 OR sum(c) <> 0 ORDER BY 1
        ON CONFLICT (did) DO UPDATE SET followers = s.followers + EXCLUDED.followers,
            follows = s.follows + EXCLUDED.follows, posts = s.posts + EXCLUDED.posts;
    END IF;
    IF current_setting('pipeline_stats.users_removed', true) <> '' THEN
        DELETE FROM user_stats WHERE followers = 0 AND follows = 0 AND posts = 0
            AND xmin = pg_current_xact_id()::xid AND did = ANY(
                ('{' || current_setting('pipeline_stats.users_removed') || '}')::text[]);
    END IF;
    PERFORM set_config('pipeline_stats.posts_keys', '', true),
            set_config('pipeline_stats.posts_codes', '', true),
            set_config('pipeline_stats.users_keys', '', true),
            set_config('pipeline_stats.users_codes', '', true),
            set_config('pipeline_stats.posts_removed', '', true),
            set_config('pipeline_stats.users_removed', '', true);
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER stats_apply AFTER INSERT ON stats_commit
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION stats_apply();

-- The record tables' triggers: for each row a statement removed (deleted, or the old side of an
-- update) its keys go down by one, for each row it added (inserted, or the new side) up by one.
-- subject_stats serves likes (argument 1) and reposts (2), whose subject_uri is the key.
CREATE FUNCTION subject_stats() RETURNS trigger LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
DECLARE
    code int := TG_ARGV[0]::int;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM stats_add('posts', -code, array_agg(subject_uri)::text, count(*))
        FROM old_rows WHERE subject_uri IS NOT NULL;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM stats_add('posts', code, array_agg(subject_uri)::text, count(*))
        FROM new_rows WHERE subject_uri IS NOT NULL;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION posts_stats() RETURNS trigger LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM stats_add('posts', -3, array_agg(reply_parent_uri)::text, count(*))
        FROM old_rows WHERE reply_parent_uri IS NOT NULL;
        PERFORM stats_add('users', -3, array_agg(author_did)::text, count(*)) FROM old_rows;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM stats_add('posts', 3, array_agg(reply_parent_uri)::text, count(*))
        FROM new_rows WHERE reply_parent_uri IS NOT NULL;
        PERFORM stats_add('users', 3, array_agg(author_did)::text, count(*)) FROM new_rows;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION follows_stats() RETURNS trigger LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM stats_add('users', -1, array_agg(subject_did)::text, count(*))
        FROM old_rows WHERE subject_did IS NOT NULL;
        PERFORM stats_add('users', -2, array_agg(author_did)::text, count(*)) FROM old_rows;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM stats_add('users', 1, array_agg(subject_did)::text, count(*))
        FROM new_rows WHERE subject_did IS NOT NULL;
        PERFORM stats_add('users', 2, array_agg(author_did)::text, count(*)) FROM new_rows;
    END IF;
    RETURN NULL;
END $$;

-- Transition tables allow one event a trigger: three triggers a table.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT * FROM (VALUES ('likes', 'subject_stats(1)'), ('reposts', 'subject_stats(2)'),
                                   ('posts', 'posts_stats()'), ('follows', 'follows_stats()'))
                           AS v (tab, fn) LOOP
        EXECUTE format('CREATE TRIGGER %1$s_stats_insert AFTER INSERT ON %1$I'
                       ' REFERENCING NEW TABLE AS new_rows'
                       ' FOR EACH STATEMENT EXECUTE FUNCTION %2$s', t.tab, t.fn);
        EXECUTE format('CREATE TRIGGER %1$s_stats_update AFTER UPDATE ON %1$I'
                       ' REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows'
                       ' FOR EACH STATEMENT EXECUTE FUNCTION %2$s', t.tab, t.fn);
        EXECUTE format('CREATE TRIGGER %1$s_stats_delete AFTER DELETE ON %1$I'
                       ' REFERENCING OLD TABLE AS old_rows'
                       ' FOR EACH STATEMENT EXECUTE FUNCTION %2$s', t.tab, t.fn);
    END LOOP;
END $$;

-- Records already there are counted by the fill. Nothing can slip in unseen: the triggers above
-- hold their tables against writes until this commits.
INSERT INTO stats_fill (name, done)
SELECT name, NOT (EXISTS (SELECT 1 FROM likes) OR EXISTS (SELECT 1 FROM reposts)
                  OR EXISTS (SELECT 1 FROM posts) OR EXISTS (SELECT 1 FROM follows))
FROM (VALUES ('post_stats'), ('user_stats')) AS t (name);
