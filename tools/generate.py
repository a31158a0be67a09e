"""Deterministic generator of Jetstream v1 events shaped like the recorded corpus.

Same seed, same bytes: benchmarks and tests can replay millions of realistic events
(likes, posts, reposts, follows, blocks, profiles, deletes, other collections, identity and
account events) from a Zipf-skewed set of authors, and serve matching DID documents. The same
events also come as signed firehose frames (`write_frames`), each author signing with the
secp256k1 key its document publishes.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import itertools
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import orjson

LIKE = "app.bsky.feed.like"
POST = "app.bsky.feed.post"
REPOST = "app.bsky.feed.repost"
FOLLOW = "app.bsky.graph.follow"
BLOCK = "app.bsky.graph.block"
PROFILE = "app.bsky.actor.profile"
LISTITEM = "app.bsky.graph.listitem"
THREADGATE = "app.bsky.feed.threadgate"
PLAY = "fm.teal.alpha.feed.play"

# Share of each action, after the recorded corpus (70% likes, 11% posts, 10% reposts, 4% follows).
MIX: dict[str, float] = {
    "like": 0.70, "post": 0.11, "repost": 0.10, "follow": 0.04, "delete": 0.02,
    "block": 0.008, "profile": 0.008, "other": 0.008, "identity": 0.003, "account": 0.003,
}
ZIPF_S = 0.8  # author activity skew: rank r posts in proportion to 1 / r**ZIPF_S
START_US = 1_783_175_888_000_000  # 2026-07-04T14:38:08Z, when the corpus was captured
START_SEQ = 31_527_015_322
CREATED_LAG_US = 750_000  # records are stamped a little before Jetstream sees them
MAX_DELETABLE = 16  # per author; bounds memory on long runs

_S32 = "234567abcdefghijklmnopqrstuvwxyz"  # base32-sortable alphabet of TIDs
_PAIRS = [a + b for a in _S32 for b in _S32]
_B32 = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lower case, as CIDs use
_B32_PAIRS = [a + b for a in _B32 for b in _B32]
_CID_SHIFTS = range(250, -1, -10)

_WORDS: dict[str, list[str]] = {
    "en": "the a to and of is in it that for on you this was with just so my be are not have but "
    "what today really love time people good new like one all about get can more out now day "
    "think know back still want going great last first year thread art game music vote news "
    "coffee cat dog weekend morning night friends book movie show finally".split(),
    "ja": "今日 本当に 待って ありがとう かわいい すごい 明日 楽しみ 猫 ご飯 仕事 眠い 最高 "
    "映画 観た 好き 雨 夏 ゲーム 配信".split(),
    "pt": "hoje muito obrigado bom dia amor gente que isso não sim mais casa trabalho".split(),
    "de": "heute sehr danke guten morgen das ist nicht ja aber wieder schön zeit".split(),
    "es": "hoy muy gracias buenos días que esto no sí pero más casa tiempo".split(),
    "ko": "오늘 정말 감사합니다 좋아요 이쁘시네용 내일 고양이 밥 일 최고".split(),
}
_LANGS: list[str] = ["en"] * 60 + ["ja"] * 15 + ["pt"] * 8 + ["de"] * 6 + ["es"] * 6 + ["ko"] * 5
_HANDLE_WORDS = "alice bob carol dave erin frank grace heidi ivan judy niaj olivia peggy".split()
_PDS_HOSTS = "elfcup enoki shiitake morel chanterelle oyster porcini puffball amanita".split()


def tid(us: int, clock: int) -> str:
    """A 13-character TID (record key / rev) for microsecond `us` and clock id 0..1023."""
    v = (us << 10) | clock
    p = _PAIRS
    return (_S32[v >> 60] + p[(v >> 50) & 1023] + p[(v >> 40) & 1023] + p[(v >> 30) & 1023]
            + p[(v >> 20) & 1023] + p[(v >> 10) & 1023] + p[v & 1023])


def cid_string(digest: int, prefix: str = "bafyrei") -> str:
    """A CIDv1 in base32 for a 256-bit sha256 digest: `bafyrei` for records, `bafkrei` blobs."""
    # After the 7 prefix characters come 2 zero bits of the multihash length, the digest, then
    # 2 bits of padding: 260 bits, or 26 pairs of characters (base64.b32encode is slow here).
    v, p = digest << 2, _B32_PAIRS
    return prefix + "".join([p[(v >> s) & 1023] for s in _CID_SHIFTS])


def did_list(n_dids: int, seed: int = 0) -> list[str]:
    """The generated authors: `did:plc:` + 24 base32 characters derived from seed and index."""
    return [_plc(f"gen:{seed}:{i}".encode()) for i in range(n_dids)]


def _plc(material: bytes) -> str:
    return "did:plc:" + base64.b32encode(hashlib.sha256(material).digest()[:15]).decode().lower()


def author_key(did: str, seed: int = 0) -> Any:
    """The secp256k1 key a generated author signs its commits with."""
    from tools.signed_frames import private_key

    return private_key(f"{seed}:{did}")


def pds_host(did: str) -> str:
    """The PDS host of a generated author: one of 18, as Bluesky's hosts are named."""
    h = hashlib.sha256(f"doc:{did}".encode()).digest()
    return f"{_PDS_HOSTS[h[1] % len(_PDS_HOSTS)]}.us-{('east', 'west')[h[2] & 1]}.host.bsky.network"


def did_documents(n_dids: int, seed: int = 0,
                  pds_port: int | None = None) -> dict[str, dict[str, Any]]:
    """PLC DID documents for the generated authors, shaped like plc.directory's answers.

    With `pds_port`, each `#atproto_pds` is `http://{host}:{pds_port}` (a PDS stub that DNS
    points the hosts at) instead of `https://{host}`."""
    from tools.signed_frames import multibase

    docs: dict[str, dict[str, Any]] = {}
    for i, did in enumerate(did_list(n_dids, seed)):
        host = pds_host(did)
        endpoint = f"https://{host}" if pds_port is None else f"http://{host}:{pds_port}"
        docs[did] = {
            "@context": [
                "https://www.w3.org/ns/did/v1",
                "https://w3id.org/security/multikey/v1",
                "https://w3id.org/security/suites/secp256k1-2019/v1",
            ],
            "id": did,
            "alsoKnownAs": [f"at://{_HANDLE_WORDS[i % len(_HANDLE_WORDS)]}{i}.test"],
            "verificationMethod": [{
                "id": f"{did}#atproto",
                "type": "Multikey",
                "controller": did,
                "publicKeyMultibase": multibase(author_key(did, seed)),
            }],
            "service": [{
                "id": "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": endpoint,
            }],
        }
    return docs


def profile_records(n_dids: int, seed: int = 0, share: float = 0.8) -> dict[str, dict[str, Any]]:
    """The profile records a PDS holds for the generated authors: `share` of them have one."""
    profiles: dict[str, dict[str, Any]] = {}
    for did in did_list(n_dids, seed):
        h = hashlib.sha256(f"profile:{did}".encode()).digest()
        if int.from_bytes(h[:8], "big") >= share * 2**64:
            continue
        profiles[did] = {
            "$type": PROFILE, "displayName": did[8:14].capitalize(),
            "description": " ".join(_WORDS["en"][b % len(_WORDS["en"])] for b in h[8:16]),
            "avatar": {"$type": "blob", "ref": {"$link": cid_string(int.from_bytes(h, "big"),
                                                                    "bafkrei")},
                       "mimeType": "image/jpeg", "size": 20_000 + h[16] * 1000},
        }
    return profiles


@dataclass(frozen=True)
class Hot:
    """A share of likes that go to a few posts, and of follows to a few users: what every shard
    counts at once when something goes viral; and a share of all events by one author, which
    all go to one shard."""

    posts: int = 0  # posts by outsiders, made up once
    users: int = 0  # the first generated authors
    share: float = 0.0  # of likes (to a hot post) and of follows (to a hot user)
    author: float = 0.0  # of all events, by the first generated author


def hot_targets(seed: int, hot: Hot) -> tuple[list[dict[str, str]], list[str]]:
    """The hot posts ({"cid", "uri"}, by outsiders) and hot users (the first authors) of a replay.

    Made without the random stream, so a replay without hot targets stays byte for byte."""
    posts = [{"cid": cid_string(int.from_bytes(hashlib.sha256(f"hot:{seed}:{i}".encode()).digest(),
                                               "big")),
              "uri": f"at://{_plc(f'ext:{seed}:{i}'.encode())}/{POST}/"
                     f"{tid(START_US - 86_400_000_000, i)}"}
             for i in range(hot.posts)]
    return posts, did_list(hot.users, seed)


@dataclass(slots=True)
class _Author:
    """What the generator remembers of one author: enough to delete and update consistently."""

    did: str
    clock: int
    deletable: list[tuple[str, str]] = field(default_factory=list)  # (collection, rkey)
    has_profile: bool = False


class _Generator:
    """Holds the random stream and the state that makes deletes and replies refer back."""

    def __init__(self, n_dids: int, seed: int, hot: Hot = Hot()) -> None:
        self.rng = random.Random(seed)
        self.authors = [_Author(d, i % 1024) for i, d in enumerate(did_list(n_dids, seed))]
        self.outsiders = [_plc(f"ext:{seed}:{i}".encode()) for i in range(4096)]
        self.hot_posts, self.hot_users = hot_targets(seed, hot)
        self.hot_share = hot.share
        self.hot_author = hot.author
        self.seed = seed
        self.recent_posts: list[dict[str, str]] = []  # {"cid", "uri"} of generated posts
        self.us = START_US
        self.seq = START_SEQ
        self._second = -1
        self._second_prefix = ""
        cum, total = [], 0.0
        for name, share in MIX.items():
            total += share
            cum.append((total, getattr(self, f"_{name}")))
        cum[-1] = (float("inf"), cum[-1][1])  # rounding must not leave a gap below 1.0
        self.actions: list[tuple[float, Callable[[_Author], dict[str, Any]]]] = cum

    def authors_sequence(self, n_events: int) -> list[_Author]:
        """Zipf-skewed authors, with every author present at least once when there is room."""
        n = len(self.authors)
        weights = itertools.accumulate(1.0 / (r + 1) ** ZIPF_S for r in range(n))
        everyone = n_events >= n
        seq = self.rng.choices(self.authors, cum_weights=list(weights),
                               k=n_events - n if everyone else n_events)
        if everyone:
            seq += self.authors
            self.rng.shuffle(seq)
        if self.hot_author:  # drawn apart, so the rest of the replay is the one without
            hot = random.Random(f"hot-author:{self.seed}")
            for i in hot.sample(range(len(seq)), round(len(seq) * self.hot_author)):
                seq[i] = self.authors[0]
        return seq

    def events(self, n_events: int) -> Iterator[bytes]:
        """One action per event, drawn by MIX, for the next author of the skewed sequence."""
        rng, actions, dumps = self.rng, self.actions, orjson.dumps
        for author in self.authors_sequence(n_events):
            self.us += 1 + int(rng.random() * 999)
            r = rng.random()
            for threshold, action in actions:
                if r < threshold:
                    break
            # orjson's bytes keep a 4 KiB buffer each; a compact copy lets callers hold many lines.
            yield bytes(memoryview(dumps(action(author))))

    # --- building blocks -------------------------------------------------------------------
    def _cid(self) -> str:
        return cid_string(self.rng.getrandbits(256))

    def _iso(self, us: int) -> str:
        second = us // 1_000_000
        if second != self._second:
            self._second = second
            stamp = datetime.fromtimestamp(second, timezone.utc)
            self._second_prefix = stamp.strftime("%Y-%m-%dT%H:%M:%S.")
        return f"{self._second_prefix}{us // 1000 % 1000:03d}Z"

    def _blob(self, mime: str = "image/jpeg") -> dict[str, Any]:
        ref = cid_string(self.rng.getrandbits(256), "bafkrei")
        size = 20_000 + int(self.rng.random() * 900_000)
        return {"$type": "blob", "ref": {"$link": ref}, "mimeType": mime, "size": size}

    def _other_did(self) -> str:
        """Mostly a generated author, sometimes someone who never posts in the stream."""
        if self.rng.random() < 0.6:
            return self.authors[int(self.rng.random() * len(self.authors))].did
        return self.outsiders[int(self.rng.random() * 4096)]

    def _post_ref(self) -> dict[str, str]:
        """A post to like, repost, quote or reply to: often one generated earlier."""
        rng, recent = self.rng, self.recent_posts
        if recent and rng.random() < 0.5:
            return recent[int(rng.random() * len(recent))]
        old_us = self.us - int(rng.random() * 30 * 86_400_000_000)
        did = self.outsiders[int(rng.random() * 4096)]
        rkey = tid(old_us, int(rng.random() * 1024))
        return {"cid": self._cid(), "uri": f"at://{did}/{POST}/{rkey}"}

    def _text(self, lang: str) -> str:
        words = self.rng.choices(_WORDS[lang], k=3 + int(self.rng.random() * 25))
        return ("" if lang == "ja" else " ").join(words)

    def _commit(self, a: _Author, op: str, collection: str, rkey: str,
                record: dict[str, Any] | None = None) -> dict[str, Any]:
        commit: dict[str, Any] = {"rev": tid(self.us, a.clock), "operation": op,
                                  "collection": collection, "rkey": rkey}
        if record is not None:
            commit["record"] = record
            commit["cid"] = self._cid()
            if op == "create" and rkey != "self":
                if len(a.deletable) >= MAX_DELETABLE:
                    a.deletable[int(self.rng.random() * MAX_DELETABLE)] = (collection, rkey)
                else:
                    a.deletable.append((collection, rkey))
        return {"did": a.did, "time_us": self.us, "kind": "commit", "commit": commit}

    def _create(self, a: _Author, collection: str, fields: dict[str, Any]) -> dict[str, Any]:
        created = self.us - CREATED_LAG_US
        record = {"$type": collection, "createdAt": self._iso(created), **fields}
        return self._commit(a, "create", collection, tid(created, a.clock), record)

    # --- actions, one per MIX entry -----------------------------------------------------------
    def _like(self, a: _Author) -> dict[str, Any]:
        hot = bool(self.hot_posts) and self.rng.random() < self.hot_share
        fields: dict[str, Any] = {
            "subject": self.hot_posts[int(self.rng.random() * len(self.hot_posts))] if hot
            else self._post_ref()}
        if self.rng.random() < 0.2:
            via = tid(self.us - 60_000_000, int(self.rng.random() * 1024))
            fields["via"] = {"cid": self._cid(), "uri": f"at://{self._other_did()}/{REPOST}/{via}"}
        return self._create(a, LIKE, fields)

    def _repost(self, a: _Author) -> dict[str, Any]:
        return self._create(a, REPOST, {"subject": self._post_ref()})

    def _follow(self, a: _Author) -> dict[str, Any]:
        if self.hot_users and self.rng.random() < self.hot_share:
            return self._create(a, FOLLOW, {
                "subject": self.hot_users[int(self.rng.random() * len(self.hot_users))]})
        return self._create(a, FOLLOW, {"subject": self._other_did()})

    def _block(self, a: _Author) -> dict[str, Any]:
        return self._create(a, BLOCK, {"subject": self._other_did()})

    def _post(self, a: _Author) -> dict[str, Any]:
        rng = self.rng
        lang = _LANGS[int(rng.random() * len(_LANGS))]
        fields: dict[str, Any] = {}
        roll = rng.random()
        if roll < 0.1:
            fields["embed"] = {"$type": "app.bsky.embed.images", "images": [
                {"alt": "", "aspectRatio": {"height": 1080, "width": 1920}, "image": self._blob()}
                for _ in range(1 + int(rng.random() * 4))]}
        elif roll < 0.17:
            fields["embed"] = {"$type": "app.bsky.embed.external", "external": {
                "description": self._text("en"), "thumb": self._blob(),
                "title": self._text("en")[:60], "uri": f"https://example.com/{tid(self.us, 0)}"}}
        elif roll < 0.22:
            fields["embed"] = {"$type": "app.bsky.embed.record", "record": self._post_ref()}
        fields["langs"] = [lang]
        if rng.random() < 0.35:
            parent = self._post_ref()
            root = parent if rng.random() < 0.6 else self._post_ref()
            fields["reply"] = {"parent": parent, "root": root}
        fields["text"] = self._text(lang)
        event = self._create(a, POST, fields)
        ref = {"cid": event["commit"]["cid"],
               "uri": f"at://{a.did}/{POST}/{event['commit']['rkey']}"}
        if len(self.recent_posts) < 4096:
            self.recent_posts.append(ref)
        else:
            self.recent_posts[int(rng.random() * 4096)] = ref
        return event

    def _profile(self, a: _Author) -> dict[str, Any]:
        op = "update" if a.has_profile else "create"
        a.has_profile = True
        record = {"$type": PROFILE, "avatar": self._blob(), "banner": self._blob(),
                  "createdAt": self._iso(self.us - CREATED_LAG_US),
                  "description": self._text("en"), "displayName": a.did[8:14].capitalize()}
        return self._commit(a, op, PROFILE, "self", record)

    def _other(self, a: _Author) -> dict[str, Any]:
        roll, us = self.rng.random(), self.us
        if roll < 0.5:
            lst = f"at://{a.did}/app.bsky.graph.list/{tid(START_US, a.clock)}"
            return self._create(a, LISTITEM, {"list": lst, "subject": self._other_did()})
        if roll < 0.8:
            post = f"at://{a.did}/{POST}/{tid(us - CREATED_LAG_US, a.clock)}"
            rule = {"$type": "app.bsky.feed.threadgate#followingRule"}
            return self._create(a, THREADGATE, {"allow": [rule], "post": post})
        return self._create(a, PLAY, {"artists": [{"artistName": "Dianna Lopez"}],
                                      "duration": 180, "trackName": self._text("en")[:40]})

    def _delete(self, a: _Author) -> dict[str, Any]:
        if not a.deletable:
            return self._like(a)  # nothing of theirs to delete yet: a new author likes instead
        i = int(self.rng.random() * len(a.deletable))
        a.deletable[i], a.deletable[-1] = a.deletable[-1], a.deletable[i]
        collection, rkey = a.deletable.pop()
        return self._commit(a, "delete", collection, rkey)

    def _identity(self, a: _Author) -> dict[str, Any]:
        self.seq += 1
        body = {"did": a.did, "seq": self.seq, "time": self._iso(self.us - 500_000)}
        return {"did": a.did, "time_us": self.us, "kind": "identity", "identity": body}

    def _account(self, a: _Author) -> dict[str, Any]:
        self.seq += 1
        active = self.rng.random() < 0.7
        body: dict[str, Any] = {"active": active, "did": a.did, "seq": self.seq}
        if not active:
            body["status"] = "deactivated"
        body["time"] = self._iso(self.us - 500_000)
        return {"did": a.did, "time_us": self.us, "kind": "account", "account": body}


def generate_events(n_events: int, n_dids: int, seed: int = 0,
                    hot: Hot = Hot()) -> Iterator[bytes]:
    """Yields `n_events` compact JSON lines (no newline) by `n_dids` authors.

    Same arguments, same bytes, so replays are reproducible.
    """
    if n_dids < 1:
        raise ValueError("n_dids must be at least 1")
    if hot.users > n_dids:
        raise ValueError("hot users are generated authors: at most n_dids of them")
    return _Generator(n_dids, seed, hot).events(n_events)


def write_replay(path: str | Path, n_events: int, n_dids: int, seed: int = 0,
                 hot: Hot = Hot()) -> int:
    """Writes a replay file (gzip when the name ends in .gz); returns the bytes of JSON written."""
    path = Path(path)
    opener = (lambda: gzip.open(path, "wb", compresslevel=1)) if path.suffix == ".gz" \
        else (lambda: open(path, "wb"))
    written = 0
    events = generate_events(n_events, n_dids, seed, hot)
    with opener() as out:
        while chunk := list(itertools.islice(events, 20_000)):
            data = b"\n".join(chunk) + b"\n"
            out.write(data)
            written += len(data)
    return written


def _frame(event: dict[str, Any], seq: int, keys: dict[str, Any], seed: int) -> bytes:
    """The firehose frame of one generated Jetstream event."""
    from tools.signed_frames import commit_frame, frame

    did, us = event["did"], event["time_us"]
    time_ = datetime.fromtimestamp(us / 1e6, timezone.utc).isoformat(timespec="milliseconds")
    time_ = time_.replace("+00:00", "Z")
    if event["kind"] == "commit":
        c = event["commit"]
        key = keys.get(did)
        if key is None:
            key = keys[did] = author_key(did, seed)
        return commit_frame(key, did, c["rev"], seq, time_,
                            [(c["operation"], f"{c['collection']}/{c['rkey']}", c.get("record"))])
    body = {**event[event["kind"]], "seq": seq, "time": time_}
    return frame(f"#{event['kind']}", body)


def write_frames(path: str | Path, n_events: int, n_dids: int, seed: int = 0,
                 hot: Hot = Hot()) -> int:
    """Writes the events of `write_replay` as a firehose recording of signed frames
    (`[u32 LE length][frame]`, uncompressed); returns the bytes written."""
    keys: dict[str, Any] = {}
    written = 0
    with open(path, "wb") as out:
        for seq, line in enumerate(generate_events(n_events, n_dids, seed, hot), START_SEQ):
            data = _frame(orjson.loads(line), seq, keys, seed)
            out.write(len(data).to_bytes(4, "little") + data)
            written += 4 + len(data)
    return written


def hot_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--hot-posts, --hot-users, --hot-share and --hot-author, for this command and the
    benchmark."""
    f = click.option("--hot-author", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                     help="Share of all events given to one author (the first, besides its "
                          "own).")(f)
    f = click.option("--hot-share", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                     help="Share of likes that go to a hot post, and of follows to a hot user.")(f)
    f = click.option("--hot-users", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Hot users (the first generated authors) that many follow.")(f)
    f = click.option("--hot-posts", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Hot posts that many like (from every shard at once).")(f)
    return f


@click.command()
@click.option("--events", "n_events", type=int, required=True, help="Number of events.")
@click.option("--dids", "n_dids", type=int, required=True, help="Number of distinct authors.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Replay file, .jsonl or .jsonl.gz (- for stdout).")
@click.option("--docs", type=click.Path(dir_okay=False), default=None,
              help="Also write the DID documents (JSON object keyed by DID), for tools.fake_plc.")
@click.option("--profiles", type=click.Path(dir_okay=False), default=None,
              help="Also write the authors' profile records (JSON object keyed by DID), for "
                   "tools.fake_pds.")
@hot_options
def main(n_events: int, n_dids: int, seed: int, out: str, docs: str | None,
         profiles: str | None, hot_posts: int, hot_users: int, hot_share: float,
         hot_author: float) -> None:
    """Generate a deterministic Jetstream v1 replay file."""
    started = time.perf_counter()
    hot = Hot(hot_posts, hot_users, hot_share, hot_author)
    if out == "-":
        for line in generate_events(n_events, n_dids, seed, hot):
            sys.stdout.buffer.write(line + b"\n")
    else:
        write_replay(out, n_events, n_dids, seed, hot)
    if docs:
        Path(docs).write_bytes(orjson.dumps(did_documents(n_dids, seed)))
    if profiles:
        Path(profiles).write_bytes(orjson.dumps(profile_records(n_dids, seed)))
    click.echo(f"{n_events} events from {n_dids} DIDs (seed {seed}) in "
               f"{time.perf_counter() - started:.1f}s", err=True)


if __name__ == "__main__":
    main()
