"""Access control with one shared secret, ``VDM_AUTH_TOKEN``, for every HTTP service of the hub.

Two ways in:

- ``Authorization: Bearer <token>`` — scripts, ``curl``, Prometheus' ``authorization`` config.
- a session cookie ``vdm_session`` — browsers, because an ``EventSource`` cannot send headers.

The cookie is never the token. It is ``v1.<expiry>.<hex HMAC-SHA256(key=token,
"vdm-session|<expiry>")>``, so any process that knows the token (the dashboard that sets it,
the stream service that reads it) can mint and check it without sharing state, and the token
itself never sits in a cookie jar, a URL or a referrer. Changing the token logs every browser
out. Every comparison of secret material is constant-time (``hmac.compare_digest``).

``RequireAuth`` is a pure ASGI middleware (Starlette's style) so the stream service (FastAPI)
and the dashboard (Flask under a2wsgi) wrap it the same way. ``LoginRoutes`` serves a small
self-contained login form for the dashboard. Neither ever logs the token, a cookie or an
``Authorization`` header.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import time
from collections.abc import Iterable
from urllib.parse import parse_qs, quote

from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vdm_hub.shared.responses import JSONResponse

log = logging.getLogger("vdm.auth")


SESSION_COOKIE = "vdm_session"
SESSION_LIFETIME = 12 * 3600  # seconds; refreshed while in use (see RequireAuth)
MAX_LIFETIME = 30 * 24 * 3600  # a cookie claiming a later expiry is refused outright
REALM = "vdm-hub"
DEFAULT_EXEMPT = ("/healthz", "/readyz")
LOGIN_PATH = "/dashboard/login"
_VERSION = "v1"
_MAX_COOKIE_LEN = 128
_MAX_FORM_BYTES = 8192


def _mac(token: str, expiry: int) -> str:
    message = f"vdm-session|{expiry}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def mint_session(token: str, *, lifetime: int = SESSION_LIFETIME, now: float | None = None) -> str:
    """A session cookie value valid for ``lifetime`` seconds; it reveals nothing of ``token``."""
    expiry = int(time.time() if now is None else now) + lifetime
    return f"{_VERSION}.{expiry}.{_mac(token, expiry)}"


def session_expiry(token: str, value: str, *, now: float | None = None) -> int | None:
    """The expiry (epoch s) of a valid, unexpired session value for ``token``, else None."""
    if len(value) > _MAX_COOKIE_LEN:
        return None
    parts = value.split(".")
    if len(parts) != 3 or parts[0] != _VERSION or not parts[1].isascii():
        return None
    if not parts[1].isdigit() or len(parts[1]) > 12:
        return None
    expiry = int(parts[1])
    # The MAC is checked before the clock, and always, so timing tells nothing about which
    # part of a forged value was wrong.
    good = hmac.compare_digest(_mac(token, expiry).encode(), parts[2].encode("utf-8", "replace"))
    current = time.time() if now is None else now
    if not good or expiry <= current or expiry > current + MAX_LIFETIME:
        return None
    return expiry


def verify_session(token: str, value: str, *, now: float | None = None) -> bool:
    return session_expiry(token, value, now=now) is not None


def token_matches(token: str, candidate: str) -> bool:
    """Constant-time check of a presented token (bearer header or login form)."""
    return hmac.compare_digest(token.encode(), candidate.encode("utf-8", "replace"))


def parse_bearer(header: str | bytes | None) -> str | None:
    """The credentials of an ``Authorization: Bearer <credentials>`` header (RFC 6750 §2.1)."""
    if header is None:
        return None
    text = header.decode("latin-1") if isinstance(header, bytes) else header
    scheme, _, credentials = text.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return None
    return credentials


def _cookie(value: str, *, max_age: int, secure: bool, domain: str | None) -> str:
    # HttpOnly: page scripts never see it. SameSite=Strict: never sent on cross-site requests,
    # which is also the CSRF defence for the dashboard's POSTs. Path=/ so the stream service on
    # the same host (another port is still the same site) receives it.
    attrs = [f"{SESSION_COOKIE}={value}", "Path=/", f"Max-Age={max_age}", "HttpOnly"]
    attrs.append("SameSite=Strict")
    if domain:
        attrs.append(f"Domain={domain}")
    if secure:
        attrs.append("Secure")
    return "; ".join(attrs)


def login_response_cookie(
    token: str, secure: bool, *, lifetime: int = SESSION_LIFETIME, domain: str | None = None
) -> str:
    """The ``Set-Cookie`` value that logs a browser in (call it only after checking the token)."""
    return _cookie(
        mint_session(token, lifetime=lifetime), max_age=lifetime, secure=secure, domain=domain
    )


def logout_cookie(secure: bool = False, *, domain: str | None = None) -> str:
    """The ``Set-Cookie`` value that removes the session cookie."""
    return _cookie("", max_age=0, secure=secure, domain=domain)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def request_is_secure(scope: Scope) -> bool:
    """Did the browser use https? (directly, or per the TLS-terminating proxy's header)."""
    if scope.get("scheme") in ("https", "wss"):
        return True
    forwarded = _header(scope, b"x-forwarded-proto") or b""
    return forwarded.split(b",")[0].strip().lower() == b"https"


def session_values(scope: Scope) -> list[str]:
    """Every ``vdm_session`` value in the Cookie header(s); stale duplicates are possible."""
    values = []
    for key, raw in scope.get("headers", ()):
        if key != b"cookie":
            continue
        for pair in bytes(raw).decode("latin-1").split(";"):
            name, sep, value = pair.strip().partition("=")
            if sep and name == SESSION_COOKIE:
                values.append(value.strip().strip('"'))
    return values


def safe_next(target: str | None, default: str) -> str:
    """A same-origin path to go to after login; anything else (open redirects) -> default."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return default
    if any(c in target for c in "\r\n\t\\") or len(target) > 2048:
        return default
    return target


# Nothing here may be cached: a login page, a refusal or a redirect depends on credentials.
_NO_STORE = {"cache-control": "no-store"}


def _redirect(location: str, cookie: str | None = None) -> Response:
    """303 to ``location`` (percent-encoded by Starlette), optionally setting a cookie."""
    headers = _NO_STORE if cookie is None else {**_NO_STORE, "set-cookie": cookie}
    return RedirectResponse(location, status_code=303, headers=headers)


class RequireAuth:
    """Lets a request through only with the right bearer token or a valid session cookie.

    Exempt: ``exempt_paths`` (health probes: orchestrators and compose healthchecks cannot log
    in), ``login_url``'s path, and every ``OPTIONS`` request — a CORS preflight never carries
    credentials (Fetch standard, CORS-preflight fetch), and an outer CORSMiddleware answers it.
    Put this middleware INSIDE the CORS middleware so a 401 still carries the CORS headers the
    browser needs to read it.

    A refused request gets 401 JSON ``{"error": "unauthorized", "message": ...}`` with
    ``WWW-Authenticate: Bearer realm="vdm-hub"``; with ``login_url`` set, a browser navigation
    (GET/HEAD accepting text/html) is sent to the login page instead (303). A session cookie
    past half its lifetime is renewed on the response, so an open dashboard stays logged in.
    """

    def __init__(
        self,
        app: ASGIApp,
        token: str,
        exempt_paths: Iterable[str] = DEFAULT_EXEMPT,
        login_url: str | None = None,
        lifetime: int = SESSION_LIFETIME,
    ) -> None:
        if not token:
            raise ValueError("RequireAuth needs a non-empty token")
        self.app = app
        self.token = token
        self.exempt = frozenset(exempt_paths) | ({login_url.split("?")[0]} if login_url else set())
        self.login_url = login_url
        self.lifetime = lifetime
        if len(token) < 16:
            log.warning(
                "VDM_AUTH_TOKEN is only %d characters; use a long random one, e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'",
                len(token),
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "OPTIONS" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return

        problem = "missing"
        bearer = parse_bearer(_header(scope, b"authorization"))
        if bearer is not None:
            if token_matches(self.token, bearer):
                await self.app(scope, receive, send)
                return
            problem = "wrong"  # a wrong bearer is refused even with a good cookie: be explicit
        else:
            expiries = [e for v in session_values(scope) if (e := session_expiry(self.token, v))]
            if expiries:
                await self.app(scope, receive, self._renewing(scope, send, max(expiries)))
                return
            if session_values(scope):
                problem = "session"

        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        if self._wants_login_page(scope):
            target = quote(self._requested(scope), safe="/")
            await _redirect(f"{self.login_url}?next={target}")(scope, receive, send)
            return
        body = {"error": "unauthorized", "message": _MESSAGES[problem]}
        headers = {**_NO_STORE, "www-authenticate": _CHALLENGES[problem]}
        await JSONResponse(body, 401, headers=headers)(scope, receive, send)

    def _wants_login_page(self, scope: Scope) -> bool:
        if not self.login_url or scope.get("method") not in ("GET", "HEAD"):
            return False
        return b"text/html" in (_header(scope, b"accept") or b"")

    @staticmethod
    def _requested(scope: Scope) -> str:
        path = str(scope.get("path", "/"))
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        return f"{path}?{query}" if query else path

    def _renewing(self, scope: Scope, send: Send, expiry: int) -> Send:
        if expiry - time.time() > self.lifetime / 2:
            return send
        cookie = login_response_cookie(
            self.token, request_is_secure(scope), lifetime=self.lifetime
        ).encode("latin-1")

        async def send_renewed(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"set-cookie", cookie)],
                }
            await send(message)

        return send_renewed


_MESSAGES = {
    "missing": "Authentication required: send 'Authorization: Bearer <VDM_AUTH_TOKEN>', "
    "or log in through the dashboard (browsers get a session cookie).",
    "wrong": "The bearer token is not the one this service was started with (VDM_AUTH_TOKEN).",
    "session": "Your session has expired or is no longer valid (the token may have changed); "
    "log in through the dashboard again.",
}
_CHALLENGES = {
    "missing": f'Bearer realm="{REALM}"',
    "wrong": f'Bearer realm="{REALM}", error="invalid_token"',
    "session": f'Bearer realm="{REALM}", error="invalid_token"',
}


# The dashboard's look (dashboard/assets/vdm.css), inline: the page's CSP allows inline styles
# only, and it is served before any asset may be (the assets need the session too).
_LOGIN_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="dark"><title>vdm-hub · log in</title>
<style>
*{{box-sizing:border-box}}
body{{margin:0;min-height:100vh;display:grid;place-items:center;padding:16px;
background:#0a0e13;color:#d6dee8;
font:16px Inter,"Segoe UI",Roboto,"DejaVu Sans",Helvetica,Arial,sans-serif}}
form{{display:grid;gap:14px;width:min(100%,24rem);padding:28px 28px 24px;
background:#0f141b;border:1px solid #232d3a;border-radius:10px;
box-shadow:0 12px 32px rgba(0,0,0,.45)}}
h1{{margin:0;font-size:24px;letter-spacing:.02em}}
h1 span{{color:#7d8b99;font-size:15px;font-weight:400;margin-left:8px}}
p{{margin:0;color:#9aa7b4;line-height:1.45}}
code{{font:14px "DejaVu Sans Mono",Menlo,Consolas,monospace;color:#d6dee8}}
label{{color:#7d8b99;font-size:13px;letter-spacing:.08em;text-transform:uppercase}}
input{{width:100%;font:inherit;padding:10px 12px;color:#d6dee8;background:#161d26;
border:1px solid #232d3a;border-radius:6px}}
input:focus{{outline:2px solid #58a6ff;outline-offset:-1px}}
button{{font:inherit;font-weight:700;padding:11px 18px;border:0;border-radius:8px;
background:#1f6feb;color:#fff;cursor:pointer}}
button:hover{{background:#388bfd}}
.error{{color:#f85149;border-left:4px solid #f85149;padding:6px 10px;
background:rgba(248,81,73,.08);border-radius:4px}}
</style></head>
<body><form method="post" action="{action}">
<h1>vdm-hub<span>fleet live metrics</span></h1>
<p>This dashboard needs the access token (<code>VDM_AUTH_TOKEN</code>).</p>
{error}<label for="token">Token</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus required>
<input type="hidden" name="next" value="{next}">
<button type="submit">Log in</button></form></body></html>
"""
_PAGE_HEADERS = {
    **_NO_STORE,
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


class LoginRoutes:
    """The dashboard's login and logout pages, in front of the (already guarded) app.

    ``GET login_path`` shows a form; ``POST login_path`` with ``token`` (urlencoded) checks it,
    sets the session cookie and sends the browser to ``next`` (same-origin paths only) or
    ``home``; a wrong token gets the form again with 401. ``GET|POST logout_path`` clears the
    cookie. Every other request goes on to ``app``.
    """

    def __init__(
        self,
        app: ASGIApp,
        token: str,
        *,
        login_path: str = LOGIN_PATH,
        logout_path: str = "/dashboard/logout",
        home: str = "/dashboard/",
        lifetime: int = SESSION_LIFETIME,
    ) -> None:
        self.app = app
        self.token = token
        self.login_path = login_path
        self.logout_path = logout_path
        self.home = home
        self.lifetime = lifetime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or path not in (self.login_path, self.logout_path):
            await self.app(scope, receive, send)
            return
        response = await self._answer(scope, receive)
        await response(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive) -> Response:
        secure = request_is_secure(scope)
        method = scope.get("method")
        if scope.get("path") == self.logout_path and method in ("GET", "POST"):
            return _redirect(self.login_path, logout_cookie(secure))
        if method in ("GET", "HEAD"):
            query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
            target = safe_next(query.get("next", [None])[0], self.home)
            if any(verify_session(self.token, v) for v in session_values(scope)):
                return _redirect(target)
            return self._page(200, target, "")
        if method == "POST":
            form = await _read_form(receive)
            target = safe_next(form.get("next"), self.home)
            if token_matches(self.token, form.get("token", "")):
                return _redirect(
                    target, login_response_cookie(self.token, secure, lifetime=self.lifetime)
                )
            log.info("dashboard login refused (wrong token)")
            return self._page(401, target, "That is not the right token.")
        headers = {**_NO_STORE, "allow": "GET, POST"}
        return PlainTextResponse("method not allowed\n", 405, headers=headers)

    def _page(self, status: int, target: str, error: str) -> Response:
        body = _LOGIN_PAGE.format(
            action=html.escape(self.login_path),
            next=html.escape(target),
            error=f'<p class="error" role="alert">{html.escape(error)}</p>' if error else "",
        )
        return HTMLResponse(body, status, headers=_PAGE_HEADERS)


async def _read_form(receive: Receive) -> dict[str, str]:
    """An urlencoded form body, at most 8 KiB (more is treated as an empty form)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return {}
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > _MAX_FORM_BYTES:
            return {}
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        parsed = parse_qs(b"".join(chunks).decode("utf-8", "replace"), max_num_fields=10)
    except ValueError:  # too many fields: not our form
        return {}
    return {k: v[0] for k, v in parsed.items() if v}


def protect_dashboard(
    app: ASGIApp,
    token: str,
    *,
    login_path: str = LOGIN_PATH,
    lifetime: int = SESSION_LIFETIME,
) -> ASGIApp:
    """The dashboard's whole access control: login/logout pages in front, everything else
    guarded, browsers without a session sent to the login page."""
    guarded = RequireAuth(
        app, token, exempt_paths=("/healthz",), login_url=login_path, lifetime=lifetime
    )
    return LoginRoutes(guarded, token, login_path=login_path, lifetime=lifetime)
