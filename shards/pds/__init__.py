"""Asking users' PDS hosts: profiles (getRecord) and repositories (getRepo), politely and guarded.

`PdsClient` goes through the identity stack's HttpFetcher (vetted addresses, TLS, caps,
timeouts), a circuit breaker and `HostLimits` per host; `PdsConfig` holds every knob."""
