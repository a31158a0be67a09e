"""The one error of verification, naming the check that failed (the dead-letter reason)."""
from __future__ import annotations

CHECKS = ("commit hash", "repo", "signature", "key", "record hash", "tree", "car")


class VerificationError(ValueError):
    """A commit or repository that must not be applied; `check` names what failed.

    str() is the check, then the detail: "signature: does not verify with the #atproto key"."""

    def __init__(self, check: str, detail: str = "") -> None:
        self.check = check
        self.detail = detail
        super().__init__(f"{check}: {detail}" if detail else check)
