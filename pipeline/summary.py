"""The figures a run reports: in the closing summary, the progress line and `--summary-json`."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from shards.stats import Histogram, ShardStats

_REFUSED = "refused."  # identity counters of refused addresses, by kind


def _kinds(counts: dict[str, int]) -> str:
    """"loopback 3, private 1": most first."""
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]))


@dataclass
class ShardFigures:
    """Per shard: the two figures of the original fix, as now and at their peak, and totals."""

    shard: int
    committed: int = 0
    users_created: int = 0
    active_user_creations: int = 0
    pending_user_creations: int = 0
    peak_active_user_creations: int = 0
    peak_pending_user_creations: int = 0
    pool_in_use: int = 0
    pool_waiting: int = 0
    refresher_backlog: int = 0


@dataclass
class Summary:
    source: str
    events_read: int
    committed: int
    dead_letters: int
    users_created: int
    users_fallback: int
    users_unverified: int
    users_refused: int
    elapsed: float
    events_per_second: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    start_cursor: int | None
    cursor: int | None
    restarts: int
    db_retries: int
    transactions: int
    progress: tuple[int, int | None]
    dead_reasons: dict[str, int] = field(default_factory=dict)
    events_by_kind: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    verify_failures: dict[str, int] = field(default_factory=dict)
    frame_time: float | None = None
    identity: dict[str, int] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)  # by kind of address refused
    shards: list[ShardFigures] = field(default_factory=list)
    latency: Histogram = field(default_factory=Histogram)

    @classmethod
    def collect(cls, *, source: str, events_read: int, committed: int, dead_letters: int,
                elapsed: float, start_cursor: int | None, cursor: int | None, restarts: int,
                shard_stats: list[ShardStats], current: dict[int, ShardStats | None],
                progress: tuple[int, int | None], source_skipped: int = 0) -> Summary:
        latency = Histogram()
        reasons: Counter[str] = Counter()
        skipped: Counter[str] = Counter({"seq not above the previous": source_skipped})
        failures: Counter[str] = Counter()
        frame_time: float | None = None
        identity: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        figures = {k: ShardFigures(k) for k in current}
        for s in shard_stats:
            latency.merge(s.latency)
            reasons.update(s.dead_reasons)
            kinds.update(s.events_by_kind)
            identity.update(s.identity)
            skipped.update(s.skipped)
            failures.update(s.verify_failures)
            if s.frame_time is not None:
                frame_time = max(frame_time or 0.0, s.frame_time)
            f = figures.setdefault(s.shard, ShardFigures(s.shard))
            f.committed += s.committed
            f.users_created += s.users_created
            f.peak_active_user_creations = max(f.peak_active_user_creations,
                                               s.peak_active_user_creations)
            f.peak_pending_user_creations = max(f.peak_pending_user_creations,
                                                s.peak_pending_user_creations)
        for k, s in current.items():
            if s is not None:  # gauges: the live process only
                f = figures[k]
                f.active_user_creations = s.active_user_creations
                f.pending_user_creations = s.pending_user_creations
                f.pool_in_use = s.pool.get("in_use", 0)
                f.pool_waiting = s.pool.get("waiting", 0)
                f.refresher_backlog = s.refresher_backlog
        p50, p99 = latency.quantile(0.5), latency.quantile(0.99)
        return cls(
            source=source, events_read=events_read, committed=committed,
            dead_letters=dead_letters,
            users_created=sum(s.users_created for s in shard_stats),
            users_fallback=sum(s.users_fallback for s in shard_stats),
            users_unverified=sum(s.users_unverified for s in shard_stats),
            users_refused=sum(s.users_refused for s in shard_stats),
            elapsed=elapsed, events_per_second=(committed + dead_letters) / elapsed if elapsed else 0.0,
            latency_p50_ms=None if p50 is None else p50 * 1000,
            latency_p99_ms=None if p99 is None else p99 * 1000,
            start_cursor=start_cursor, cursor=cursor, restarts=restarts,
            db_retries=sum(s.db_retries for s in shard_stats),
            transactions=sum(s.transactions for s in shard_stats),
            progress=progress, dead_reasons=dict(reasons), events_by_kind=dict(kinds),
            skipped={k: v for k, v in skipped.items() if v}, verify_failures=dict(failures),
            frame_time=frame_time,
            identity=dict(identity), shards=[figures[k] for k in sorted(figures)], latency=latency,
            refusals={k[len(_REFUSED):]: v for k, v in sorted(identity.items())
                      if k.startswith(_REFUSED) and v},
        )

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["latency"]
        return out

    def render(self) -> str:
        """The closing summary, for people."""
        ms = lambda v: "-" if v is None else f"{v:.1f} ms"  # noqa: E731
        lines = [
            f"source            {self.source}",
            f"started at cursor {self.start_cursor if self.start_cursor is not None else 'the beginning'}"
            f"; cursor now {self.cursor}",
            f"events read       {self.events_read}",
            f"committed         {self.committed}",
            f"dead-lettered     {self.dead_letters}"
            + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.dead_reasons.items())) + ")"
               if self.dead_reasons else ""),
            *(["skipped           " + ", ".join(
                f"{k}: {v}" for k, v in sorted(self.skipped.items()))] if self.skipped else []),
            *(["verification      failed " + ", ".join(
                f"{k}: {v}" for k, v in sorted(self.verify_failures.items()))]
              if self.verify_failures else []),
            f"users created     {self.users_created} ({self.users_fallback} with the DID as"
            f" fallback handle, {self.users_unverified} with a handle not yet verified)",
            f"elapsed           {self.elapsed:.2f} s, {self.events_per_second:,.0f} events/s",
            f"read to commit    p50 {ms(self.latency_p50_ms)}, p99 {ms(self.latency_p99_ms)}",
            f"worker restarts   {self.restarts}; database retries {self.db_retries}",
            "shard  committed  users  active-user-creations  pending-user-creation-dedup"
            "  (peak active / peak pending)",
        ]
        for f in self.shards:
            lines.append(
                f"{f.shard:>5}  {f.committed:>9}  {f.users_created:>5}  {f.active_user_creations:>21}"
                f"  {f.pending_user_creations:>27}  ({f.peak_active_user_creations}"
                f" / {f.peak_pending_user_creations})"
            )
        identity = {k: v for k, v in self.identity.items()
                    if v and not k.startswith(("pds.", "backfill.", _REFUSED))}
        if identity:
            lines.append("identity          " + ", ".join(
                f"{k} {v}" for k, v in sorted(identity.items())))
        if self.refusals:
            lines.append(f"refused addresses {sum(self.refusals.values())}"
                         f" ({_kinds(self.refusals)}): hosts named by the network's data must be"
                         " public unless --allow-private-addresses")
        profiles = {k[12:]: v for k, v in self.identity.items() if k.startswith("pds.profile.")}
        if any(profiles.values()):
            limited = {k[17:]: v for k, v in self.identity.items()
                       if k.startswith("pds.rate_limited.") and v}
            lines.append("profiles fetched  " + ", ".join(
                f"{k} {v}" for k, v in sorted(profiles.items()) if v)
                + (f" (429s: {sum(limited.values())} from {len(limited)} hosts)" if limited
                   else ""))
        backfills = {k[9:]: v for k, v in self.identity.items() if k.startswith("backfill.") and v}
        if backfills:
            lines.append("repositories      " + ", ".join(
                f"{k} {v}" for k, v in sorted(backfills.items())) + " (new users backfilled)")
        return "\n".join(lines)

    def refusal_warning(self) -> str | None:
        """A warning when every new user's lookup was refused: most likely a setting, not data."""
        if not self.users_created or self.users_refused < self.users_created:
            return None
        return (f"every new user's lookup was refused ({self.users_refused} of"
                f" {self.users_created}): the hosts their DID documents, handles or redirects name"
                f" resolve to non-public addresses ({_kinds(self.refusals)}); only"
                " --allow-private-addresses lets the network's data reach such addresses")
