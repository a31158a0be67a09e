"""The identity interface every resolver, cache and breaker implements, and its errors."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

INVALID_HANDLE = "handle.invalid"


@dataclass(frozen=True)
class Identity:
    """What the pipeline stores about an account: the claimed or verified handle and its PDS,
    and the document's verification methods, where firehose commits find the signing key."""

    did: str
    handle: str
    handle_verified: bool = False
    pds: str | None = None
    verification_methods: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    @property
    def complete(self) -> bool:
        """A verified handle, or a definitive `handle.invalid`, needs no more refreshing."""
        return self.handle_verified or self.handle == INVALID_HANDLE

    def verified(self, ok: bool) -> Identity:
        return replace(self, handle_verified=ok, handle=self.handle if ok else INVALID_HANDLE)


class IdentityError(Exception):
    """Base of every resolution error; `reason` names its kind where a user's row keeps it."""

    reason = "lookup failed"


class DIDNotFound(IdentityError):
    """The DID does not exist upstream (HTTP 404/410): a final answer, cached briefly."""

    reason = "not found"


class ResolutionFailed(IdentityError):
    """Transport error, timeout, bad status, oversized or malformed answer: retry later.

    `upstream` names the host (or `dns:<server>`) that failed to answer, when one is to
    blame; the circuit breaker counts failures against it."""

    def __init__(self, *args: object, upstream: str | None = None) -> None:
        super().__init__(*args)
        self.upstream = upstream


class DIDMismatch(ResolutionFailed):
    """The document's `id` is not the DID that was asked for."""

    reason = "DID mismatch"


class AddressRefused(ResolutionFailed):
    """A host named by the network's data resolves to a private, loopback, link-local... address.

    `kind` is what the refused address is (see addresses.address_kind)."""

    def __init__(self, host: str, address: str, kind: str) -> None:
        super().__init__(f"{host} resolves to {kind} address {address}"
                         " (allowed only with --allow-private-addresses)")
        self.host, self.address, self.kind = host, address, kind
        self.reason = f"refused {kind} address"


def failure_reason(exc: BaseException) -> str:
    """"reason: detail" of a failed resolution, as `users.resolve_error` keeps it."""
    reason = exc.reason if isinstance(exc, IdentityError) else "error"
    return f"{reason}: {exc}"[:500]


class Directory(Protocol):
    """Resolves DIDs to identities; wrappers (cache, breaker) implement it too."""

    def resolve_did(self, did: str) -> Identity:
        """The DID document's claimed handle (or `handle.invalid` if none) and PDS, unverified."""
        ...

    def verify(self, ident: Identity) -> Identity:
        """Checks that the handle points back to the DID (DNS TXT, then HTTPS well-known).

        Returns the identity verified, or with `handle.invalid` when it points elsewhere;
        raises ResolutionFailed when the check could not be made."""
        ...

    def purge(self, did: str) -> None:
        """Forgets anything cached for the DID (identity events)."""
        ...
