"""The dashboard's security: who may look and act, the login page, and the headers.

* The guard middleware (`install_guard`) checks every request's ``Host`` header and
  credentials (`qmlkit.dashboard.auth.Auth`), answers 401 (the login page for a person,
  JSON for a script) without them, turns a storage failure into a quick 503, and adds
  the security headers to every response.
* Every response carries a Content-Security-Policy that allows scripts, styles and
  images from the dashboard itself only (no inline script or style), plus ``nosniff``,
  ``X-Frame-Options: DENY`` and ``Referrer-Policy: same-origin`` (with ``no-referrer``
  browsers send ``Origin: null`` on same-origin form posts) (field case C14).
* Actions (`guard_action`) are refused in read-only mode, and without a Bearer header
  they need the CSRF token and a same-origin ``Origin``; WebSockets
  (`websocket_admitted`) pass the same authentication and origin check.
* ``/login`` and ``/logout`` (`router`) start a server-side session (a random cookie
  that expires) and revoke it.
* A client that sent too many wrong tokens (`qmlkit.dashboard.ratelimit`) gets 429 with
  ``Retry-After`` for every token it presents, right or wrong, until its lockout ends.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from fastapi import APIRouter, FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from qmlkit.dashboard.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    Auth,
    LockedOut,
    host_allowed,
    same_origin,
)
from qmlkit.dashboard.config import DashboardConfig
from qmlkit.dashboard.pages import render
from qmlkit.errors import StorageError

log = logging.getLogger(__name__)

#: Paths served without authentication (the login page and static files).
PUBLIC_PREFIXES = ("/static/", "/login")

#: A Host header fit to be written into the CSP: a name or an address, optional port.
_HOST = re.compile(r"([A-Za-z0-9.\-]+|\[[0-9a-fA-F:.]+\])(:[0-9]{1,5})?")

router = APIRouter(include_in_schema=False)


def content_security_policy(host: str | None) -> str:
    """Return the CSP sent with every response: this origin only, nothing inline.

    Args:
        host: The request's ``Host`` header, for the WebSocket source (``ws://host``);
            ``None`` or anything but a host name or address with an optional port
            leaves WebSockets to ``'self'``.
    """
    safe = host is not None and _HOST.fullmatch(host)
    connect = "'self'" + (f" ws://{host} wss://{host}" if safe else "")
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
            f"connect-src {connect}; font-src 'self'; form-action 'self'; base-uri 'none'; "
            "frame-ancestors 'none'")


def security_headers(host: str | None) -> dict[str, str]:
    """Return the headers added to every response (CSP, nosniff, framing, referrer)."""
    return {
        "Content-Security-Policy": content_security_policy(host),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
        "Cross-Origin-Opener-Policy": "same-origin",
    }


def safe_next(target: str) -> str:
    """Only same-site paths may follow a login (no open redirect)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def client_of(connection: Request | WebSocket) -> str:
    """The address the failed-login limits count by: the peer the ASGI server saw."""
    return connection.client.host if connection.client else "unknown"


def locked_out(exc: LockedOut) -> Response:
    """429 for a locked-out client, with ``Retry-After`` in whole seconds."""
    return JSONResponse({"detail": str(exc)}, status_code=429,
                        headers={"Retry-After": str(max(1, round(exc.retry_after_s)))})


def unauthorized(request: Request) -> Response:
    """401: JSON with ``WWW-Authenticate`` for the API, the login page for people."""
    if request.url.path.startswith("/api/") or "text/html" not in request.headers.get(
            "accept", ""):
        return JSONResponse({"detail": "authentication required: Authorization: Bearer "
                                       "<token>, or basic auth with the token as password"},
                            status_code=401,
                            headers={"WWW-Authenticate": 'Bearer realm="qmlkit", Basic '
                                                         'realm="qmlkit"'})
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    page: Response = request.app.state.templates.TemplateResponse(request, "login.html", {
        "csrf": "", "read_only": False, "auth_required": True, "nav": "", "logged_in": False,
        "next": safe_next(target), "error": None}, status_code=401)
    return page


async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                ) -> Response:
    """Check the Host header and the credentials; add the security headers."""
    auth: Auth = request.app.state.auth
    host = request.headers.get("host")
    if not host_allowed(host, auth_required=auth.required):
        response: Response = JSONResponse({"detail": "host not allowed"}, status_code=400)
    else:
        response = await authenticated(request, call_next)
    for name, value in security_headers(host).items():
        response.headers.setdefault(name, value)
    return response


async def authenticated(request: Request,
                        call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Run the route if the request authenticated or is public; else 401 (or 429)."""
    auth: Auth = request.app.state.auth
    try:
        method = auth.method(request.headers, request.cookies, client_of(request))
    except LockedOut as exc:
        return locked_out(exc)
    request.state.auth_method = method
    if method is None and not request.url.path.startswith(PUBLIC_PREFIXES):
        return unauthorized(request)
    return await answer(request, call_next)


async def answer(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                 ) -> Response:
    """Run the route; a storage failure is a quick 503, any other error a logged 500."""
    path = request.url.path
    try:
        return await call_next(request)
    except StorageError as exc:  # storage down or refusing: say so, quickly
        log.warning("dashboard request %s failed: %s: %s", path, type(exc).__name__, exc)
        return JSONResponse({"detail": f"the storage is unavailable: {type(exc).__name__}"},
                            status_code=503, headers={"Retry-After": "5"})
    except Exception:  # answered, with the security headers
        log.exception("dashboard request %s failed", path)
        return JSONResponse({"detail": "internal error"}, status_code=500)


def install_guard(api: FastAPI) -> None:
    """Add the `guard` middleware to ``api`` (whose state holds ``auth`` and ``templates``)."""
    api.middleware("http")(guard)


def guard_action(request: Request) -> None:
    """Refuse an action in read-only mode (403), or without CSRF proof (403)."""
    config: DashboardConfig = request.app.state.config
    auth: Auth = request.app.state.auth
    if config.read_only:
        raise HTTPException(403, "the dashboard is read-only")
    if request.state.auth_method == "bearer":
        return
    if not same_origin(request.headers.get("origin"), request.headers.get("host")):
        raise HTTPException(403, "cross-origin request refused")
    if not auth.csrf_ok(request.headers.get(CSRF_HEADER), request.cookies):
        raise HTTPException(403, "missing or wrong CSRF token (X-CSRF-Token header)")


def websocket_admitted(ws: WebSocket) -> bool:
    """Whether a WebSocket may open: allowed host, authenticated, same origin."""
    auth: Auth = ws.app.state.auth
    if not host_allowed(ws.headers.get("host"), auth_required=auth.required):
        return False
    try:
        method = auth.method(ws.headers, ws.cookies, client_of(ws))
    except LockedOut:
        return False
    return method is not None and same_origin(ws.headers.get("origin"), ws.headers.get("host"))


async def form_of(request: Request) -> dict[str, list[str]]:
    """The request's ``application/x-www-form-urlencoded`` body."""
    return parse_qs((await request.body()).decode("utf-8", "replace"))


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/") -> HTMLResponse:
    """The login form (asks for the token)."""
    return render(request, "login.html", nav="", next=safe_next(next), error=None)


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the token (under the failed-login limits); on success start a session and
    go to ``next``."""
    auth: Auth = request.app.state.auth
    config: DashboardConfig = request.app.state.config
    if not same_origin(request.headers.get("origin"), request.headers.get("host")):
        raise HTTPException(403, "cross-origin request refused")
    form = await form_of(request)
    token = (form.get("token") or [""])[0]
    target = safe_next((form.get("next") or ["/"])[0])
    if not auth.required:
        return RedirectResponse(target, status_code=303)
    try:
        right = auth.check_token(token, client_of(request))
    except LockedOut as exc:
        refused = render(request, "login.html", status_code=429, nav="", next=target,
                         error=f"Too many wrong tokens: {exc}.")
        refused.headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        return refused
    if not right:  # the form again, as an authentication failure
        return render(request, "login.html", status_code=401, nav="", next=target,
                      error="That token is not right.")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(SESSION_COOKIE, auth.new_session(), max_age=int(config.session_ttl_s),
                        httponly=True, samesite="strict", secure=request.url.scheme == "https",
                        path="/")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    """End the session on the server and forget its cookie (CSRF-checked like every POST)."""
    auth: Auth = request.app.state.auth
    form = await form_of(request)
    given = request.headers.get(CSRF_HEADER) or (form.get(CSRF_FIELD) or [""])[0]
    if not auth.csrf_ok(given, request.cookies):
        raise HTTPException(403, "missing or wrong CSRF token")
    auth.revoke(request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
