"""Who may use the viewer: loopback by default; any other address needs a token (or an explicit `no_auth`).

A request carries the token as `Authorization: Bearer TOKEN`, an `X-Token` header, the `cytoretrieve_token`
cookie (set when the page is opened as `/?token=TOKEN`, so the page's own requests and pictures carry it) or a
`token` query parameter. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import os

from cytoretrieve.errors import CytoError

TOKEN_ENV = "CYTORETRIEVE_TOKEN"
COOKIE = "cytoretrieve_token"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None, no_auth: bool) -> str | None:
    """The token the server will require (None = none): the given one, else `CYTORETRIEVE_TOKEN`; a non-loopback
    `host` without either is refused unless `no_auth`."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if no_auth:
        return None
    if token is None and not is_loopback(host):
        raise CytoError(f"serving on {host} (not loopback) needs a `token` (or {TOKEN_ENV}); "
                        "pass `no_auth` to serve without one")
    return token


def token_ok(expected: str | None, header: str | None, x_token: str | None, cookie: str | None,
             query: str | None) -> bool:
    """Whether a request carries the expected token in any of its accepted places (always True with no token)."""
    if expected is None:
        return True
    bearer = header[7:] if header and header.lower().startswith("bearer ") else None
    return any(v is not None and hmac.compare_digest(v.encode(), expected.encode())
               for v in (bearer, x_token, cookie, query))
