"""The labeling web app: FastAPI, server-rendered Jinja2 pages (autoescaped), SQLite through :mod:`.store`.

Security model, in one place:

* Sessions: a random token in an HttpOnly, SameSite=Strict cookie; the database keeps only its hash.
* CSRF: every POST carries the session's CSRF token (the login form a double-submit cookie), compared in constant
  time; a POST whose Origin header names another host is refused as well.
* Access: a labeler can read and submit only the tasks assigned to them; the admin page is for admins.
* Untrusted text (prompts, model outputs, usernames) only ever reaches the page through Jinja2 autoescaping, and the
  Content-Security-Policy allows no inline script and nothing from outside this server.
* Forms are parsed here from the urlencoded body (bounded in size), so no multipart parser is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qs, urlsplit

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from instructgpt.labeling import security
from instructgpt.labeling.agreement import agreement_report, format_rate
from instructgpt.labeling.rubric import (FLAGS, RATING_MAX, RATING_MIN, SubmissionError, check_demonstration,
                                         check_ranking)
from instructgpt.labeling.store import Session, Store, display_order

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "igpt_session"
LOGIN_CSRF_COOKIE = "igpt_login_csrf"
MAX_FORM_BYTES = 256 * 1024
MAX_FORM_FIELDS = 400
STATIC_FILES = {"app.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LABELS = "ABCDEFGHI"
PREVIEW_CHARS = 120

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


@dataclass
class ShownOutput:
    """One of a task's K outputs as a labeler sees it: a letter in their (shuffled) order, and its position."""

    index: int  # position in the task's responses (what the form fields are named by)
    label: str  # A, B, C ... in display order
    text: str

    @property
    def preview(self) -> str:
        flat = " ".join(self.text.split())
        return flat if len(flat) <= PREVIEW_CHARS else flat[:PREVIEW_CHARS - 1] + "…"


def _host_of(host_header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:80' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def create_app(store: Store | str, *, allowed_hosts: Sequence[str] | None = None, title: str = "instructgpt labeling",
               secure_cookies: bool = False, login_throttle: security.LoginThrottle | None = None) -> FastAPI:
    """The app over `store` (a :class:`Store` or a database path).

    `allowed_hosts`: Host header values accepted (None accepts any); the CLI passes the loopback names when it binds
    to loopback, which stops DNS-rebinding pages from talking to the app. `secure_cookies` adds the Secure flag (set
    it behind HTTPS). `login_throttle`: failed-login limits (default: :class:`security.LoginThrottle`'s, its failures
    kept in the store).
    """
    store = store if isinstance(store, Store) else Store(store)
    # failed logins counted in the database by default, so restarting the app does not reset them
    throttle = login_throttle or security.LoginThrottle(failures=store.login_failures())
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=select_autoescape(default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    hosts = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}

    # ---------------------------------------------------------------------------------------------------------------
    # Plumbing: headers, pages, forms, sessions

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if hosts is not None and _host_of(request.headers.get("host", "")) not in hosts:
            return PlainTextResponse("invalid Host header", status_code=400)
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    def page(template: str, session: Session | None, status: int = 200, **ctx) -> HTMLResponse:
        html = env.get_template(template).render(title=title, session=session, progress=ctx.pop("progress", None),
                                                 **ctx)
        return HTMLResponse(html, status_code=status)

    def error_page(session: Session | None, status: int, message: str) -> HTMLResponse:
        return page("error.html", session, status=status, status_code=status, message=message)

    async def form(request: Request) -> dict[str, list[str]]:
        """The urlencoded body as {name: [values]}, read with a size bound."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise HTTPException(415, "expected a form (application/x-www-form-urlencoded)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise HTTPException(413, "form too large")
        try:
            return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
        except (UnicodeDecodeError, ValueError):
            raise HTTPException(400, "malformed form") from None

    def current_session(request: Request) -> Session | None:
        return store.session(request.cookies.get(SESSION_COOKIE))

    def check_origin(request: Request) -> None:
        """Refuse a POST sent by a page of another origin (SameSite cookies and the CSRF token are the main line)."""
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
            raise HTTPException(403, "cross-origin request refused")

    def csrf_session(request: Request, data: dict = Depends(form),
                     session: Session | None = Depends(current_session)) -> tuple[Session, dict]:
        """The session of a state-changing request, after the CSRF check; raises 403 otherwise."""
        check_origin(request)
        if session is None:
            raise HTTPException(403, "not logged in (your session may have expired): log in again")
        if not security.tokens_equal(first(data, "csrf_token"), session.csrf_token):
            raise HTTPException(403, "invalid or missing CSRF token: reload the page and try again")
        return session, data

    def first(data: dict, key: str) -> str | None:
        values = data.get(key)
        return values[0] if values else None

    def login_redirect() -> RedirectResponse:
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        session = await _run_sync(current_session, request)
        return error_page(session, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_path(request: Request, exc: RequestValidationError):
        # e.g. /task/abc: there is no such page
        return error_page(await _run_sync(current_session, request), 404, "no such page")

    # ---------------------------------------------------------------------------------------------------------------
    # Static files and health

    @app.get("/static/{name}")
    def static(name: str):
        if name not in STATIC_FILES:
            raise HTTPException(404, "not found")
        return FileResponse(HERE / "static" / name, media_type=STATIC_FILES[name],
                            headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz():
        return "ok"

    # ---------------------------------------------------------------------------------------------------------------
    # Login

    @app.get("/login")
    def login_form(request: Request, session: Session | None = Depends(current_session)):
        if session is not None:
            return RedirectResponse("/", status_code=303)
        return _login_page(None, 200)

    def _login_page(error: str | None, status: int, username: str = "") -> HTMLResponse:
        token = security.new_token()
        response = page("login.html", None, status=status, csrf_token=token, error=error,
                        username=username)
        response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=secure_cookies,
                            path="/login")
        return response

    @app.post("/login")
    def login(request: Request, data: dict = Depends(form)):
        check_origin(request)
        if not security.tokens_equal(first(data, "csrf_token"), request.cookies.get(LOGIN_CSRF_COOKIE)):
            raise HTTPException(403, "invalid or missing CSRF token: reload the login page and try again")
        username, password = (first(data, "username") or "").strip(), first(data, "password") or ""
        keys = [f"user:{username.lower()}", f"addr:{request.client.host if request.client else '-'}"]
        wait = throttle.wait(keys)
        if wait > 0:  # refused before the password is checked, so guesses in the lockout learn nothing
            minutes = max(1, math.ceil(wait / 60))
            response = _login_page(f"Too many failed logins: try again in {minutes} minute"
                                   f"{'s' if minutes > 1 else ''}.", 429, username=username)
            response.headers["Retry-After"] = str(math.ceil(wait))
            return response
        user = store.authenticate(username, password)
        if user is None:
            throttle.failed(keys)
            return _login_page("Wrong username or password.", 401, username=username)
        throttle.succeeded(keys[0])
        token, _ = store.create_session(user.id)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", secure=secure_cookies, path="/")
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return response

    @app.post("/logout")
    def logout(request: Request, auth: tuple[Session, dict] = Depends(csrf_session)):
        store.end_session(request.cookies.get(SESSION_COOKIE, ""))
        response = login_redirect()
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # ---------------------------------------------------------------------------------------------------------------
    # The labeler's queue

    @app.get("/")
    def home(session: Session | None = Depends(current_session)):
        if session is None:
            return login_redirect()
        return RedirectResponse("/admin" if session.user.is_admin else "/next", status_code=303)

    @app.get("/next")
    def next_task(request: Request, session: Session | None = Depends(current_session)):
        if session is None:
            return login_redirect()
        task_id = store.claim_next(session.user.id)
        if task_id is None:
            return page("done.html", session, progress=store.progress(session.user.id))
        # Pass on which task was just submitted: the page's script then drops that task's saved draft.
        done = request.query_params.get("submitted", "")
        return RedirectResponse(f"/task/{task_id}" + (f"?submitted={int(done)}" if done.isdigit() else ""),
                                status_code=303)

    def shown_outputs(task, user_id: int) -> list[ShownOutput]:
        order = display_order(task.id, user_id, len(task.responses))
        return [ShownOutput(i, LABELS[n], task.responses[i]) for n, i in enumerate(order)]

    def task_page(session: Session, task, status: int = 200, error: str | None = None,
                  values: dict | None = None) -> HTMLResponse:
        ctx = dict(task=task, csrf_token=session.csrf_token, error=error, values=values or {},
                   progress=store.progress(session.user.id))
        if task.kind == "demonstration":
            return page("demonstration.html", session, status=status, **ctx)
        return page("ranking.html", session, status=status, outputs=shown_outputs(task, session.user.id),
                    flags=FLAGS, ratings=range(RATING_MIN, RATING_MAX + 1), k=len(task.responses), **ctx)

    def owned_task(task_id: int, session: Session):
        """The task if it is in this labeler's queue and still open; 404 otherwise (existence is not revealed)."""
        found = store.assigned_task(task_id, session.user.id)
        if found is None:
            raise HTTPException(404, "this task is not in your queue")
        return found

    @app.get("/task/{task_id}")
    def show_task(task_id: int, session: Session | None = Depends(current_session)):
        if session is None:
            return login_redirect()
        task, state = owned_task(task_id, session)
        if state != "open":
            return RedirectResponse("/next", status_code=303)
        return task_page(session, task)

    @app.post("/task/{task_id}")
    def submit_task(task_id: int, auth: tuple[Session, dict] = Depends(csrf_session)):
        session, data = auth
        task, state = owned_task(task_id, session)
        if state != "open":  # a double submit: the first one counted, carry on
            return RedirectResponse(f"/next?submitted={task.id}", status_code=303)
        try:
            if task.kind == "demonstration":
                text = check_demonstration(first(data, "response") or "")
                result = store.submit_demonstration(task.id, session.user.id, text)
            else:
                fields = parse_ranking_form(data, shown_outputs(task, session.user.id))
                result = store.submit_ranking(task.id, session.user.id, check_ranking(len(task.responses), *fields))
        except SubmissionError as e:
            return task_page(session, task, status=400, error=str(e), values=data)
        if result.status == "not_assigned":
            raise HTTPException(404, "this task is not in your queue")
        return RedirectResponse(f"/next?submitted={task.id}", status_code=303)

    @app.post("/task/{task_id}/skip")
    def skip_task(task_id: int, auth: tuple[Session, dict] = Depends(csrf_session)):
        session, _ = auth
        owned_task(task_id, session)
        store.skip(task_id, session.user.id)
        return RedirectResponse(f"/next?submitted={task_id}", status_code=303)

    # ---------------------------------------------------------------------------------------------------------------
    # Admin

    @app.get("/admin")
    def admin(session: Session | None = Depends(current_session)):
        if session is None:
            return login_redirect()
        if not session.user.is_admin:
            raise HTTPException(403, "the admin page is for admins")
        report = agreement_report(store.rankings_by_task())
        mean_se = report.mean_and_stderr
        rows = store.labeler_rows()
        for r in rows:
            la = report.per_labeler.get(r["username"])
            r["agreement"] = format_rate(la.rate if la else None)
            r["agreement_pairs"] = la.comparable if la else 0
        return page("admin.html", session, counts=store.counts(), rows=rows, report=report,
                    pooled=format_rate(report.rate), mean_se=format_rate(*mean_se) if mean_se else "—",
                    csrf_token=session.csrf_token)

    return app


def parse_ranking_form(data: dict[str, list[str]], outputs: list[ShownOutput]
                       ) -> tuple[list[int], list[int], list[list[str]]]:
    """(ranks, ratings, flags) indexed like the task's responses, from fields rank_i, rating_i, flag_i."""
    k = len(outputs)
    ranks, ratings, flags = [0] * k, [0] * k, [[] for _ in range(k)]
    for out in sorted(outputs, key=lambda o: o.label):
        i = out.index
        for name, target, what in ((f"rating_{i}", ratings, "a rating"), (f"rank_{i}", ranks, "a rank")):
            raw = (data.get(name) or [""])[0].strip()
            if not raw:
                raise SubmissionError(f"Output {out.label} needs {what}.")
            try:
                target[i] = int(raw)
            except ValueError:
                raise SubmissionError(f"Output {out.label}: {what[2:]} must be a whole number.") from None
        flags[i] = list(data.get(f"flag_{i}") or [])
    return ranks, ratings, flags


async def _run_sync(fn, *args):
    return await run_in_threadpool(fn, *args)

