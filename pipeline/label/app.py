"""The labelling web app (FastAPI, served by uvicorn): one page for annotators, one for admins, and a
small JSON API under ``/api``.

    POST /api/signin   {"token"}                        sets an HttpOnly, SameSite=Strict cookie
    POST /api/next     {"n"}                            up to n items for the signed-in annotator
    POST /api/label    {"item", "choice", "submission_id", "duration_ms"}
    GET  /api/image/{item_key}/{index}                  an image of an item handed to the caller
    GET  /api/me, /api/admin/summary, /healthz
    POST /api/admin/close-round {"round"}               an online loop's round closes now (admins)

Every API call authenticates with the cookie or an ``Authorization: Bearer TOKEN`` header; the
annotator is whoever the token belongs to (request bodies have no annotator field: one is refused).
Request bodies over ``max_body_bytes`` get 413, malformed ones 422 with a message; an unexpected
error is logged and answered 500 without details. Pages carry a strict Content-Security-Policy (no
inline script), and captions are set as text, never as HTML.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.label import assignment, audit, rounds
from pipeline.label.people import Person, authenticate
from pipeline.label.sources import ImageReader, media_type
from pipeline.label.storage import Database, Unavailable
from pipeline.schema.label import LabelConfig

log = logging.getLogger("pipeline.label")
COOKIE = "label_token"
THREADS = 16  # request threads per app process, so at most 16 database connections each
ITEM_KEY = r"^[A-Za-z0-9]{1,64}$"
STATIC = {"app.js": "text/javascript", "admin.js": "text/javascript", "style.css": "text/css"}
PAGES = {"/": "index.html", "/admin": "admin.html"}
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SignIn(_Strict):
    token: str = Field(min_length=1, max_length=256)


class NextRequest(_Strict):
    n: int = Field(default=1, ge=1, le=16)


class LabelRequest(_Strict):
    item: str = Field(pattern=ITEM_KEY)
    choice: str = Field(min_length=1, max_length=8)  # image index in the item, "tie" or "skip"
    submission_id: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")  # made by the client; a retry reuses it
    duration_ms: int = Field(ge=0, le=86_400_000)  # how long the item was on screen


class CloseRound(_Strict):
    round: int = Field(ge=0)


class _BodyLimit:
    """Refuse request bodies over ``max_bytes``: by Content-Length at once, or while they stream."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await JSONResponse({"detail": "bad Content-Length"}, 400)(scope, receive, send)
            if int(length) > self.max_bytes:
                return await JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, 413)(
                    scope, receive, send
                )
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return msg

        return await self.app(scope, limited, send)


class _SecurityHeaders:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(msg):
            if msg["type"] == "http.response.start":
                msg["headers"] = list(msg.get("headers", [])) + SECURITY_HEADERS
            await send(msg)

        return await self.app(scope, receive, send_with_headers)


def _static(name: str) -> bytes:
    return resources.files("pipeline.label").joinpath("static", name).read_bytes()


def _person(request: Request) -> Person:
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else request.cookies.get(COOKIE)
    p = authenticate(request.app.state.db, token)
    if p is None:
        raise HTTPException(401, "sign in first: open the link your admin gave you")
    return p


Anyone = Annotated[Person, Depends(_person)]


def _annotator(p: Anyone) -> Person:
    if p.role != "annotator":
        raise HTTPException(403, "this is an admin token: labels come from annotator tokens")
    return p


def _admin(p: Anyone) -> Person:
    if p.role != "admin":
        raise HTTPException(403, "this needs an admin token")
    return p


Annotator = Annotated[Person, Depends(_annotator)]
Admin = Annotated[Person, Depends(_admin)]


def create_app(
    db: Database,
    policy: assignment.Policy,
    preload: int = 1,
    max_body_bytes: int = 16384,
    images: ImageReader | None = None,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # requests run in a thread pool, each thread with its own database connection: bound both
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        yield
        db.close()

    app = FastAPI(title="labelling", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.db = db
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(_SecurityHeaders)
    images = images or ImageReader()
    files = {name: _static(name) for name in [*STATIC, *PAGES.values()]}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            if e.get("type") == "json_invalid":
                parts.append(f"body: not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})")
                continue
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts)[:1000]}, 422)

    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Unavailable):
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(
            {"detail": "the database is unavailable: try again"}, 503, headers={"retry-after": "2"}
        )

    @app.exception_handler(assignment.Refused)
    async def _refused(request: Request, exc: assignment.Refused):
        return JSONResponse({"detail": exc.message}, exc.status)

    @app.exception_handler(Exception)
    async def _error(request: Request, exc: Exception):
        log.exception("error answering %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error (logged on the server)"}, 500)

    for route, page in PAGES.items():

        def serve_page(page: str = page) -> Response:
            return Response(files[page], media_type="text/html", headers={"cache-control": "no-cache"})

        app.add_api_route(route, serve_page, methods=["GET"], include_in_schema=False)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, "no such file")
        return Response(files[name], media_type=STATIC[name], headers={"cache-control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.post("/api/signin")
    def signin(body: SignIn, request: Request, response: Response) -> dict:
        p = authenticate(db, body.token)
        if p is None:
            raise HTTPException(401, "unknown or revoked token")
        secure = request.url.scheme == "https"
        response.set_cookie(
            COOKIE, body.token, httponly=True, samesite="strict", secure=secure, path="/", max_age=14 * 86400
        )
        return {"name": p.name, "role": p.role}

    @app.post("/api/signout")
    def signout(response: Response) -> dict:
        response.delete_cookie(COOKIE, path="/")
        return {"ok": True}

    @app.get("/api/me")
    def me(p: Anyone) -> dict:
        out = {"name": p.name, "user_id": p.user_id, "role": p.role, "preload": preload}
        if p.role == "annotator":
            out["progress"] = assignment.progress(db, p.id, policy.per_item)
        return out

    @app.post("/api/next")
    def next_items(body: NextRequest, p: Annotator) -> dict:
        items = assignment.next_items(db, p.id, body.n, policy)
        for it in items:
            it["images"] = [{"index": i, "url": f"api/image/{it['key']}/{i}"} for i in it.pop("display")]
        return {"items": items, "progress": assignment.progress(db, p.id, policy.per_item)}

    @app.post("/api/label")
    def label(body: LabelRequest, p: Annotator) -> dict:
        label_id, duplicate = assignment.record_label(
            db, p.id, body.item, body.choice, body.submission_id, body.duration_ms
        )
        return {"ok": True, "label_id": label_id, "duplicate": duplicate}

    @app.get("/api/image/{item_key}/{index}")
    def image(
        item_key: Annotated[str, PathParam(pattern=ITEM_KEY)],
        index: Annotated[int, PathParam(ge=0, le=63)],
        p: Anyone,
    ) -> Response:
        with db.tx() as c:
            if p.role == "admin":
                row = c.execute("SELECT refs FROM items WHERE key = ?", (item_key,)).fetchone()
            else:  # an annotator sees the images of items handed to them only
                row = c.execute(
                    "SELECT i.refs FROM items i JOIN assignments a ON a.item_id = i.id "
                    "WHERE i.key = ? AND a.annotator_id = ?",
                    (item_key, p.id),
                ).fetchone()
        refs = json.loads(row[0]) if row else []
        if index >= len(refs):
            raise HTTPException(404, "no such image")
        try:
            data = images.read(refs[index])
        except (OSError, KeyError, ValueError) as e:
            log.error("item %s image %d unreadable at %s: %s", item_key, index, refs[index], e)
            raise HTTPException(404, "image not available") from e
        return Response(
            data, media_type=media_type(data), headers={"cache-control": "private, max-age=86400"}
        )

    @app.get("/api/admin/summary")
    def admin_summary(p: Admin) -> dict:
        s = audit.summary(db, policy.per_item)
        state = rounds.round_state(db)
        if state is not None:  # an online loop's campaign: the current round and its progress
            s["round"] = {**state, **rounds.progress(db, state["round"], policy.per_item)}
        return s

    @app.post("/api/admin/close-round")
    def close_round(body: CloseRound, p: Admin) -> dict:
        state = rounds.round_state(db)
        if state is None or state["round"] != body.round:
            raise HTTPException(409, f"round {body.round} is not the current round")
        if rounds.progress(db, body.round, policy.per_item)["decisive_labels"] == 0:
            raise HTTPException(
                409, f"round {body.round} has no label yet: there would be nothing to train on"
            )
        return rounds.close_round(db, body.round, f"admin {p.name}")

    return app


# -- several app processes (uvicorn workers): each builds its app from the config file named here
CONFIG_ENV = "LABEL_APP_CONFIG"


def app_from_config(cfg) -> FastAPI:
    policy = assignment.Policy(
        cfg.assignment.per_item, cfg.assignment.lease_s, cfg.checks.every if cfg.checks.count else 0
    )
    return create_app(Database(cfg.db), policy, cfg.assignment.preload, cfg.server.max_body_bytes)


def app_from_env() -> FastAPI:
    path = os.environ.get(CONFIG_ENV)
    if not path or not Path(path).is_file():
        raise UserError(f"{CONFIG_ENV}: expected the path of a resolved label config")
    return app_from_config(load_config(LabelConfig, path))
