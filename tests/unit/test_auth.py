"""shared/auth.py: session values, bearer parsing, the RequireAuth middleware, the login pages."""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from vdm_hub.shared import auth

TOKEN = "s3cret-token-0123456789abcdef"
ORIGIN = "http://dash.example:8050"


# -- session values ---------------------------------------------------------------------------


def test_minted_session_verifies_and_hides_the_token() -> None:
    value = auth.mint_session(TOKEN)
    assert auth.verify_session(TOKEN, value)
    assert TOKEN not in value
    version, expiry, mac = value.split(".")
    assert version == "v1"
    assert int(expiry) == pytest.approx(time.time() + auth.SESSION_LIFETIME, abs=5)
    assert len(mac) == 64


def test_session_expires() -> None:
    value = auth.mint_session(TOKEN, lifetime=60, now=1_000_000)
    assert auth.verify_session(TOKEN, value, now=1_000_059)
    assert not auth.verify_session(TOKEN, value, now=1_000_060)
    assert auth.session_expiry(TOKEN, value, now=1_000_000) == 1_000_060


def test_session_for_another_token_is_refused() -> None:
    assert not auth.verify_session(TOKEN, auth.mint_session("another-token-entirely"))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda v: v.replace("v1.", "v2.", 1),
        lambda v: "v1." + str(int(v.split(".")[1]) + 3600) + "." + v.split(".")[2],
        lambda v: v[:-1] + ("0" if v[-1] != "0" else "1"),
        lambda v: v.rsplit(".", 1)[0],
        lambda v: v + ".x",
        lambda v: "",
        lambda v: TOKEN,
        lambda v: v.upper(),
        lambda v: v + "0" * 200,
    ],
)
def test_tampered_session_is_refused(tamper: Any) -> None:
    value = auth.mint_session(TOKEN)
    assert auth.verify_session(TOKEN, value)
    assert not auth.verify_session(TOKEN, tamper(value))


def test_session_with_implausibly_late_expiry_is_refused() -> None:
    # Minted with the right token, but valid for a year: refused (MAX_LIFETIME).
    assert not auth.verify_session(TOKEN, auth.mint_session(TOKEN, lifetime=365 * 86400))


def test_secret_comparisons_are_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # auth calls hmac.compare_digest
    assert auth.token_matches(TOKEN, TOKEN)
    assert not auth.token_matches(TOKEN, "nope")
    assert not auth.token_matches(TOKEN, "ünïcode")
    assert len(calls) == 3
    value = auth.mint_session(TOKEN)
    assert auth.verify_session(TOKEN, value)
    assert len(calls) == 4


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc  ", "abc"),
        (b"Bearer abc", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_bearer(header: str | bytes | None, expected: str | None) -> None:
    assert auth.parse_bearer(header) == expected


def test_login_cookie_flags() -> None:
    cookie = auth.login_response_cookie(TOKEN, secure=False)
    name, _, rest = cookie.partition("=")
    value = rest.split(";")[0]
    assert name == "vdm_session" and auth.verify_session(TOKEN, value)
    attrs = {a.strip() for a in cookie.split(";")[1:]}
    assert {"HttpOnly", "SameSite=Strict", "Path=/", f"Max-Age={auth.SESSION_LIFETIME}"} <= attrs
    assert "Secure" not in attrs
    assert "Secure" in auth.login_response_cookie(TOKEN, secure=True)
    assert TOKEN not in cookie


def test_logout_cookie_clears() -> None:
    cookie = auth.logout_cookie(secure=True)
    assert cookie.startswith("vdm_session=;")
    assert "Max-Age=0" in cookie and "Secure" in cookie and "HttpOnly" in cookie


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/dashboard/metrics?x=1", "/dashboard/metrics?x=1"),
        (None, "/home"),
        ("https://evil.example/", "/home"),
        ("//evil.example/", "/home"),
        ("/\\evil.example/", "/home"),
        ("/ok\r\nSet-Cookie: x=y", "/home"),
    ],
)
def test_safe_next(target: str | None, expected: str) -> None:
    assert auth.safe_next(target, "/home") == expected


# -- the middleware ---------------------------------------------------------------------------


def _inner_app() -> Starlette:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    return Starlette(
        routes=[
            Route("/metrics", hello),
            Route("/healthz", hello),
            Route("/dashboard/metrics", hello),
        ]
    )


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = _stack(login_url=None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        yield c


def _stack(login_url: str | None) -> Any:
    inner: Any = _inner_app()
    return CORSMiddleware(
        auth.RequireAuth(inner, TOKEN, login_url=login_url),
        allow_origins=[ORIGIN],
        allow_methods=["GET"],
        allow_headers=["Authorization"],
        allow_credentials=True,
    )


def _cookie_header(value: str) -> dict[str, str]:
    return {"cookie": f"other=1; {auth.SESSION_COOKIE}={value}"}


async def test_bearer_token_gets_in(client: httpx.AsyncClient) -> None:
    r = await client.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.text == "hello"


async def test_session_cookie_gets_in(client: httpx.AsyncClient) -> None:
    r = await client.get("/metrics", headers=_cookie_header(auth.mint_session(TOKEN)))
    assert r.status_code == 200 and r.text == "hello"
    assert "set-cookie" not in r.headers  # fresh: no renewal


async def test_missing_credentials_get_401_json_with_a_message(client: httpx.AsyncClient) -> None:
    r = await client.get("/metrics")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="vdm-hub"'
    body = r.json()
    assert body["error"] == "unauthorized"
    assert "Authorization: Bearer" in body["message"]


async def test_wrong_bearer_gets_401_naming_the_token(client: httpx.AsyncClient) -> None:
    r = await client.get("/metrics", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert "VDM_AUTH_TOKEN" in r.json()["message"]
    assert "wrong" not in r.text and TOKEN not in r.text


async def test_wrong_bearer_is_refused_even_with_a_good_cookie(client: httpx.AsyncClient) -> None:
    headers = {"authorization": "Bearer wrong", **_cookie_header(auth.mint_session(TOKEN))}
    assert (await client.get("/metrics", headers=headers)).status_code == 401


async def test_expired_or_forged_cookie_gets_401_saying_log_in_again(
    client: httpx.AsyncClient,
) -> None:
    expired = auth.mint_session(TOKEN, lifetime=10, now=time.time() - 60)
    for value in (expired, auth.mint_session("other-token-xxxxxxxx"), TOKEN):
        r = await client.get("/metrics", headers=_cookie_header(value))
        assert r.status_code == 401
        assert "log in" in r.json()["message"]


async def test_a_stale_duplicate_cookie_does_not_hide_a_good_one(
    client: httpx.AsyncClient,
) -> None:
    good = auth.mint_session(TOKEN)
    cookie = f"{auth.SESSION_COOKIE}=v1.1.dead; {auth.SESSION_COOKIE}={good}"
    assert (await client.get("/metrics", headers={"cookie": cookie})).status_code == 200


async def test_healthz_is_exempt(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200


async def test_cors_preflight_passes_without_credentials(client: httpx.AsyncClient) -> None:
    r = await client.options(
        "/metrics",
        headers={
            "origin": ORIGIN,
            "access-control-request-method": "GET",
            "access-control-request-headers": "authorization",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()


async def test_401_carries_cors_headers_for_an_allowed_origin(client: httpx.AsyncClient) -> None:
    r = await client.get("/metrics", headers={"origin": ORIGIN})
    assert r.status_code == 401
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert r.headers["access-control-allow-credentials"] == "true"


async def test_401_carries_no_cors_headers_for_another_origin(client: httpx.AsyncClient) -> None:
    r = await client.get("/metrics", headers={"origin": "http://evil.example"})
    assert r.status_code == 401
    assert "access-control-allow-origin" not in r.headers


async def test_html_navigation_is_sent_to_the_login_page() -> None:
    app = _stack(login_url="/dashboard/login")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.get("/dashboard/metrics?tab=2", headers={"accept": "text/html,*/*"})
        assert r.status_code == 303
        assert r.headers["location"] == "/dashboard/login?next=/dashboard/metrics%3Ftab%3D2"
        # Not a browser navigation (a fetch, a Dash callback): plain 401 JSON.
        r = await c.get("/dashboard/metrics", headers={"accept": "application/json"})
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        # Without login_url even browsers get the 401 (the stream service).
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(_stack(None)), base_url="http://t"
    ) as c:
        r = await c.get("/dashboard/metrics", headers={"accept": "text/html"})
        assert r.status_code == 401


async def test_session_past_half_life_is_renewed(client: httpx.AsyncClient) -> None:
    old = auth.mint_session(TOKEN, lifetime=100, now=time.time())  # 100 s left of 12 h
    r = await client.get("/metrics", headers=_cookie_header(old))
    assert r.status_code == 200
    renewed = r.headers["set-cookie"]
    value = renewed.split(";")[0].split("=", 1)[1]
    assert auth.session_expiry(TOKEN, value) == pytest.approx(
        time.time() + auth.SESSION_LIFETIME, abs=5
    )
    assert "HttpOnly" in renewed and "Secure" not in renewed


async def test_renewed_cookie_is_secure_behind_a_tls_proxy(client: httpx.AsyncClient) -> None:
    old = auth.mint_session(TOKEN, lifetime=100)
    headers = {**_cookie_header(old), "x-forwarded-proto": "https"}
    r = await client.get("/metrics", headers=headers)
    assert "Secure" in r.headers["set-cookie"]


def test_empty_token_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        auth.RequireAuth(_inner_app(), "")


# -- the dashboard's login pages --------------------------------------------------------------


@pytest.fixture
async def dashboard() -> AsyncIterator[httpx.AsyncClient]:
    app: Any = auth.protect_dashboard(_inner_app(), TOKEN)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        yield c


async def test_login_page_is_a_form_without_the_token(dashboard: httpx.AsyncClient) -> None:
    r = await dashboard.get("/dashboard/login?next=/dashboard/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert '<form method="post" action="/dashboard/login">' in r.text
    assert 'name="next" value="/dashboard/metrics"' in r.text
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert TOKEN not in r.text


async def test_login_with_the_right_token_sets_the_cookie_and_redirects(
    dashboard: httpx.AsyncClient,
) -> None:
    r = await dashboard.post(
        "/dashboard/login", data={"token": TOKEN, "next": "/dashboard/metrics"}
    )
    assert r.status_code == 303
    assert r.headers["location"] == "/dashboard/metrics"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    # The client keeps the cookie: the guarded page now answers.
    assert (await dashboard.get("/dashboard/metrics")).text == "hello"
    # And the login page sends a logged-in browser straight on.
    r = await dashboard.get("/dashboard/login")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/"


async def test_login_with_a_wrong_token_shows_the_form_again(dashboard: httpx.AsyncClient) -> None:
    r = await dashboard.post("/dashboard/login", data={"token": "nope", "next": "//evil.example"})
    assert r.status_code == 401
    assert "not the right token" in r.text
    assert "set-cookie" not in r.headers
    assert 'value="/dashboard/"' in r.text  # the open redirect was dropped
    assert (await dashboard.get("/dashboard/metrics")).status_code == 401


async def test_oversized_login_form_is_refused(dashboard: httpx.AsyncClient) -> None:
    r = await dashboard.post("/dashboard/login", data={"token": TOKEN, "pad": "x" * 10_000})
    assert r.status_code == 401


async def test_logout_clears_the_cookie(dashboard: httpx.AsyncClient) -> None:
    await dashboard.post("/dashboard/login", data={"token": TOKEN})
    assert (await dashboard.get("/dashboard/metrics")).status_code == 200
    r = await dashboard.post("/dashboard/logout")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
    assert "Max-Age=0" in r.headers["set-cookie"]
    assert (await dashboard.get("/dashboard/metrics")).status_code == 401


async def test_dashboard_pages_redirect_to_login_but_healthz_stays_open(
    dashboard: httpx.AsyncClient,
) -> None:
    r = await dashboard.get("/dashboard/metrics", headers={"accept": "text/html"})
    assert r.status_code == 303
    assert r.headers["location"].startswith("/dashboard/login?next=")
    assert (await dashboard.get("/healthz")).status_code == 200


async def test_nothing_secret_is_logged(
    client: httpx.AsyncClient, dashboard: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    session = auth.mint_session(TOKEN)
    await client.get("/metrics", headers={"authorization": f"Bearer {TOKEN}x"})
    await client.get("/metrics", headers=_cookie_header(session + "0"))
    await dashboard.post("/dashboard/login", data={"token": TOKEN + "x"})
    await dashboard.post("/dashboard/login", data={"token": TOKEN})
    assert "login refused" in caplog.text  # something was logged, and it was harmless
    assert TOKEN not in caplog.text and session not in caplog.text


async def test_no_answer_of_the_access_control_may_be_cached(dashboard: httpx.AsyncClient) -> None:
    refused = await dashboard.get("/dashboard/metrics")
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "application/json"
    assert int(refused.headers["content-length"]) == len(refused.content)
    answers = [
        refused,
        await dashboard.get("/dashboard/metrics", headers={"accept": "text/html"}),  # 303
        await dashboard.get("/dashboard/login"),  # the form
        await dashboard.post("/dashboard/login", data={"token": "nope"}),  # the form again
        await dashboard.put("/dashboard/login"),  # 405
        await dashboard.post("/dashboard/login", data={"token": TOKEN}),  # 303 + cookie
        await dashboard.post("/dashboard/logout"),  # 303 + cookie removed
    ]
    assert [r.status_code for r in answers] == [401, 303, 200, 401, 405, 303, 303]
    assert all(r.headers["cache-control"] == "no-store" for r in answers)
    assert answers[4].headers["allow"] == "GET, POST"


async def test_a_non_ascii_next_is_percent_encoded_in_the_redirect(
    dashboard: httpx.AsyncClient,
) -> None:
    r = await dashboard.post("/dashboard/login", data={"token": TOKEN, "next": "/dashboard/ü"})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/%C3%BC"
