"""did:plc: the document comes from the PLC directory, `GET {plc_url}/{did}`."""
from __future__ import annotations

import re
from urllib.parse import urlsplit

from .addresses import Trust
from .config import IdentityConfig
from .directory import DIDNotFound, Identity
from .document import fetch_identity
from .http import HttpFetcher
from .metrics import Counters

# 24 base32 characters: anything else cannot exist in the directory (and stays out of the URL).
_PLC_DID = re.compile(r"did:plc:[a-z2-7]{24}")


class PlcResolver:
    """Resolves did:plc identifiers against one PLC directory, the operator's: its address is used
    as given (a local mirror is common), while any redirect away from it is vetted."""

    def __init__(self, config: IdentityConfig, http: HttpFetcher, counters: Counters) -> None:
        self._base = config.plc_url.rstrip("/")
        self._max_bytes = config.did_doc_max_bytes
        self._http = http
        self._counters = counters
        parts = urlsplit(self._base)
        self.host = parts.hostname or ""
        self.upstream = parts.netloc.lower()

    def resolve(self, did: str) -> Identity:
        """Raises DIDNotFound (404/410, malformed DID) or ResolutionFailed (incl. DIDMismatch)."""
        if _PLC_DID.fullmatch(did) is None:
            raise DIDNotFound(f"{did} is not a well-formed did:plc")
        return fetch_identity(
            self._http, self._counters, "plc", did, f"{self._base}/{did}", self._max_bytes,
            missing_host_is_not_found=False,  # the directory itself missing is an outage
            upstream=self.upstream, trust=Trust.OPERATOR,
        )
