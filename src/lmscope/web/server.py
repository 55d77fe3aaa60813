"""The ``lmscope serve`` app: a JSON API over the public lmscope API, and the bundled page that uses it.

Model work runs as jobs (``jobs.py``) on worker threads, one at a time per model; the event loop only
validates requests and reads job state, so the page stays responsive while a model is busy.
Only the models registered at start can be used (requests name a model id, never a path).
"""

from __future__ import annotations

import copy
import json
import threading
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import LmscopeError
from . import features
from .features import Result
from .jobs import DONE, JobManager
from .uploads import UploadError, Uploads

KINDS = ("inspect", "explain", "heads", "dla", "pattern", "compare", "audit", "features", "feature")


@dataclass
class Limits:
    """What one request may ask for. Over a limit the API answers 413 (body) or 422 (text) with a message."""

    max_body_bytes: int = 64 * 1024
    max_chars: int = 4000
    max_tokens: int = 256
    max_generate: int = 16
    max_upload_bytes: int = 32 * 2**20  # one uploaded file (Audit tab); over it: 413
    max_audit_cases: int = 5000  # cases one audit may run


@dataclass
class ModelEntry:
    id: str
    lm: Any
    tokenizer: Any = None  # a private copy for request validation, so it never races the job threads
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self) -> dict:
        lm = self.lm
        return {
            "id": self.id,
            "name": lm.name,
            "family": lm.family.name,
            "causal": lm.is_causal,
            "n_layers": lm.n_layers,
            "n_heads": lm.n_heads,
            "n_kv_heads": lm.n_kv_heads,
            "d_model": lm.d_model,
            "n_params": lm.n_params(),
            "max_positions": lm.max_positions,
            "vocab_size": lm.vocab_size,
        }

    def count_tokens(self, text: str) -> int:
        with self.tokenizer_lock:
            return len(self.tokenizer(text)["input_ids"])


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.message, self.status = message, status


def compare_mismatch(a, b) -> str | None:
    """Why ``b`` cannot be compared as a compressed copy of ``a`` (None when it can)."""
    if not a.is_causal or not b.is_causal:
        return "compare needs two causal language models (an encoder has no next-token prediction)"
    if a.vocab_size != b.vocab_size or a.d_model != b.d_model:
        return "they differ in vocabulary or width — pick a model and its compressed copy"
    return None


def _err(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# -- static files -------------------------------------------------------------------------------------
STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
}


def _static_files() -> dict[str, tuple[bytes, str]]:
    """Every file the page may fetch, read once from the package: the page's own files and the shared
    widget renderer (views/assets). Serving is a dictionary lookup, so no path can escape it."""
    files = {}
    roots = [
        resources.files("lmscope.web").joinpath("static"),
        resources.files("lmscope.views").joinpath("assets"),
    ]
    for root in roots:
        for item in root.iterdir():
            suffix = "." + item.name.rsplit(".", 1)[-1]
            if item.is_file() and suffix in STATIC_TYPES:
                files.setdefault(item.name, (item.read_bytes(), STATIC_TYPES[suffix]))
    return files


# -- request validation ---------------------------------------------------------------------------------
async def read_json(request: Request, limit: int) -> dict:
    # a JSON content type makes a cross-site POST need a CORS preflight, which this server never grants
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise BadRequest("send the request as JSON (Content-Type: application/json)", 415)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(
            f"the request is {int(declared)} bytes, over the limit of {limit} bytes; send a shorter text", 413
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(f"the request is over the limit of {limit} bytes; send a shorter text", 413)
    try:
        data = json.loads(body.decode("utf-8") or "null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


def _str_field(data: dict, key: str, required: bool = False) -> str | None:
    value = data.get(key)
    if value is None or (isinstance(value, str) and value == "" and not required):
        if required:
            raise BadRequest(f"'{key}' is missing")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string")
    return value


def _int_field(data: dict, key: str, lo: int, hi: int, default: int | None = None) -> int | None:
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise BadRequest(f"'{key}' must be an integer") from None
    if not lo <= value <= hi:
        raise BadRequest(f"'{key}' is {value}, it must be between {lo} and {hi}")
    return value


class App:
    """Holds the registered models, the job manager and the limits; ``build()`` makes the FastAPI app."""

    def __init__(
        self,
        models: dict[str, Any],
        limits: Limits | None = None,
        workers: int = 4,
        allowed_hosts: list[str] | None = None,
        dictionaries: dict[str, Any] | None = None,
        upload_dir: str | None = None,
    ):
        if not models:
            raise LmscopeError("no model to serve", "pass --model NAME (e.g. --model smollm2)")
        self.models = {mid: ModelEntry(mid, lm, copy.deepcopy(lm.tokenizer)) for mid, lm in models.items()}
        self.limits = limits or Limits()
        self.jobs = JobManager(workers=workers)
        self.static = _static_files()
        self.allowed_hosts = allowed_hosts
        self.uploads = Uploads(self.limits.max_upload_bytes, base=upload_dir)
        self.dictionaries = dictionaries or {}  # id -> web.features.DictionaryEntry (the Features tab)

    # -- validation helpers -------------------------------------------------------------------------
    def model(self, data: dict, key: str = "model") -> ModelEntry:
        mid = _str_field(data, key, required=True)
        if mid not in self.models:
            raise BadRequest(f"unknown model '{mid}'; this server has: {', '.join(self.models)}")
        return self.models[mid]

    def text(self, data: dict, entry: ModelEntry, key: str = "text") -> str:
        text = data.get(key)
        if text is None or (isinstance(text, str) and not text.strip()):
            raise BadRequest("the text is empty; type or paste some text")
        if not isinstance(text, str):
            raise BadRequest(f"'{key}' must be a string")
        if len(text) > self.limits.max_chars:
            raise BadRequest(
                f"the text is {len(text)} characters, over the limit of {self.limits.max_chars}; shorten it"
            )
        n = entry.count_tokens(text)
        limit = min(self.limits.max_tokens, entry.lm.max_positions)
        if n > limit:
            raise BadRequest(
                f"the text is {n} tokens, over this server's limit of {limit} tokens for {entry.id}; shorten it"
            )
        return text

    def single_token(self, entry: ModelEntry, value: str | None, name: str) -> str | None:
        if value is None:
            return None
        if not entry.lm.is_causal:
            raise BadRequest(f"a {name} needs a causal language model; {entry.id} is an encoder")
        from ..explain.targets import single_token_id

        try:
            with entry.tokenizer_lock:
                single_token_id(entry.lm, value, flag=name)
        except LmscopeError as e:  # the same check and message as the CLI
            raise BadRequest(str(e)) from None
        return value

    # -- jobs -------------------------------------------------------------------------------------
    def create_job(self, data: dict):
        kind = _str_field(data, "kind", required=True)
        if kind not in KINDS:
            raise BadRequest(f"unknown job kind '{kind}'; use one of: {', '.join(KINDS)}")
        if kind == "compare":
            return self._compare_job(data)
        if kind == "audit":
            from .audit_tab import audit_job

            return audit_job(self, data)
        if kind in ("features", "feature"):
            from .features_tab import features_job

            return features_job(self, data, kind)
        entry = self.model(data)
        lm = entry.lm
        if kind == "heads":
            scored_on = _str_field(data, "scored_on") or "builtin"
            if scored_on not in ("builtin", "text"):
                raise BadRequest(
                    "'scored_on' must be 'builtin' (the built-in text) or 'text' (the text sent)"
                )
            text = self.text(data, entry) if scored_on == "text" else None
            approx = _str_field(data, "approx")
            if approx not in (None, "", "atp", "atp-graddrop"):
                raise BadRequest(
                    "'approx' must be 'atp' or 'atp-graddrop' (attribution patching) or left out (exact)"
                )
            approx = approx or None
            return self.jobs.submit(kind, entry.id, lambda ctx: features.heads(ctx, lm, text, approx))
        text = self.text(data, entry)
        if kind == "inspect":
            return self.jobs.submit(kind, entry.id, lambda ctx: features.inspect(ctx, lm, text))
        if kind == "pattern":
            layer = _int_field(data, "layer", 0, lm.n_layers - 1, 0)
            head = _int_field(data, "head", 0, lm.n_heads - 1, 0)
            return self.jobs.submit(kind, entry.id, lambda ctx: features.pattern(ctx, lm, text, layer, head))
        if kind == "dla":
            if not lm.is_causal:
                raise BadRequest(f"{entry.id} is an encoder: direct logit attribution needs a causal model")
            target = self.single_token(entry, _str_field(data, "target"), "target")
            contrast = self.single_token(entry, _str_field(data, "contrast"), "contrast")
            if contrast and not target:
                raise BadRequest("a contrast needs a target")
            return self.jobs.submit(kind, entry.id, lambda ctx: features.dla(ctx, lm, text, target, contrast))
        if kind == "explain":
            target = self.single_token(entry, _str_field(data, "target"), "target")
            contrast = self.single_token(entry, _str_field(data, "contrast"), "contrast")
            pair = _str_field(data, "pair")
            if not lm.is_causal and not (pair and pair.strip()):
                raise BadRequest(f"{entry.id} is an encoder: give a second text to compare with (pair)")
            if pair is not None:
                self.text({"text": pair}, entry)
            methods = data.get("methods")
            if methods is not None and (
                not isinstance(methods, list) or not all(isinstance(m, str) for m in methods)
            ):
                raise BadRequest("'methods' must be a list of method names")
            generate = _int_field(data, "generate", 0, self.limits.max_generate, 0)
            if generate and not lm.is_causal:
                raise BadRequest(f"{entry.id} is an encoder: it does not generate text")
            if generate and (target or contrast):
                raise BadRequest(
                    "generation steps explain each generated token: leave target and contrast empty"
                )
            known = features.explain_methods()
            unknown = [m for m in methods or [] if m not in known]
            if unknown:
                raise BadRequest(
                    f"unknown attribution method '{unknown[0]}'; use some of: {', '.join(known)}"
                )
            opts = {
                "target": target,
                "contrast": contrast,
                "pair": pair,
                "methods": methods or None,
                "generate": generate,
                "sanity": bool(data.get("sanity", False)),
            }
            return self.jobs.submit(kind, entry.id, lambda ctx: features.explain(ctx, lm, text, **opts))
        raise BadRequest(f"unknown job kind '{kind}'")

    def _compare_job(self, data: dict):
        original = self.model(data, "original")
        compressed = self.model(data, "compressed")
        if original.id == compressed.id:
            raise BadRequest("pick two different models to compare (start the server with two --model)")
        why = compare_mismatch(original.lm, compressed.lm)
        if why:
            raise BadRequest(f"cannot compare {original.id} with {compressed.id}: {why}")
        text = self.text(data, original)
        a, b = original.lm, compressed.lm
        return self.jobs.submit(
            "compare", [original.id, compressed.id], lambda ctx: features.compare(ctx, a, b, text)
        )

    def notes(self, data: dict) -> list[str]:
        """Hints about an accepted request the page shows (a target without its leading space)."""
        if data.get("kind") != "explain":
            return []
        from ..explain.targets import leading_space_hint

        entry = self.model(data)
        out = []
        for field_name in ("target", "contrast"):
            with entry.tokenizer_lock:
                hint = leading_space_hint(entry.lm, data.get("text") or "", data.get(field_name), field_name)
            if hint:
                out.append(hint)
        return out

    def info(self) -> dict:
        return {
            "version": __version__,
            "models": [e.describe() for e in self.models.values()],
            "limits": asdict(self.limits),
            "features": features.status(),
            "dictionaries": [e.describe() for e in self.dictionaries.values()],
            "swap_lists": features.swap_lists(),
        }

    # -- the FastAPI app --------------------------------------------------------------------------
    def build(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(_app):
            yield
            self.jobs.shutdown()
            self.uploads.remove_all()  # folders of jobs that never ran (cancelled at shutdown)

        app = FastAPI(
            title="lmscope",
            version=__version__,
            docs_url=None,
            redoc_url=None,
            openapi_url=None,
            lifespan=lifespan,
        )
        if (
            self.allowed_hosts
        ):  # a page on another site cannot reach us by rebinding its DNS name to 127.0.0.1
            from starlette.middleware.trustedhost import TrustedHostMiddleware

            app.add_middleware(TrustedHostMiddleware, allowed_hosts=self.allowed_hosts)
        app.state.lmscope = self

        @app.exception_handler(BadRequest)
        async def _bad(_request, exc: BadRequest):
            return _err(exc.message, exc.status)

        @app.exception_handler(UploadError)
        async def _upload_bad(_request, exc: UploadError):
            return _err(exc.message, exc.status)

        @app.exception_handler(StarletteHTTPException)
        async def _http(_request, exc: StarletteHTTPException):
            return _err(str(exc.detail) if exc.status_code != 404 else "not found", exc.status_code)

        @app.exception_handler(RequestValidationError)
        async def _invalid(_request, exc: RequestValidationError):
            return _err("invalid request: " + "; ".join(e.get("msg", "") for e in exc.errors()), 422)

        @app.exception_handler(Exception)
        async def _internal(_request, exc: Exception):
            return _err(f"internal error: {type(exc).__name__}", 500)

        @app.get("/", include_in_schema=False)
        def index():
            return HTMLResponse(self.static["index.html"][0])

        @app.get("/favicon.ico", include_in_schema=False)
        def favicon():  # browsers ask on every load; an empty answer keeps the console clean
            return Response(status_code=204)

        @app.get("/static/{name:path}", include_in_schema=False)
        def static(name: str):
            found = self.static.get(name)
            if found is None:
                return _err("not found", 404)
            return Response(found[0], media_type=found[1], headers={"Cache-Control": "no-cache"})

        @app.get("/api/info")
        def api_info():
            return self.info()

        @app.post("/api/jobs", status_code=202)
        async def api_create(request: Request):
            data = await read_json(request, self.limits.max_body_bytes)
            job = self.create_job(data)
            return JSONResponse({**job.to_dict(), "notes": self.notes(data)}, status_code=202)

        @app.post("/api/uploads", status_code=201)
        async def api_upload(request: Request, name: str = ""):
            upload = await self.uploads.receive(request, name)
            return JSONResponse(upload.describe(), status_code=201)

        @app.get("/api/jobs/{job_id}/files/{name}")
        def api_file(job_id: str, name: str):
            found = (self._result(job_id).files or {}).get(name)
            if found is None:
                return _err(f"this result has no file '{name}'", 404)
            return Response(found[0], media_type=found[1], headers=_attachment(name))

        @app.get("/api/jobs/{job_id}")
        def api_job(job_id: str, wait: float = 0.0):
            job = self._job(job_id)
            if wait > 0:  # long poll, bounded: answers as soon as the job finishes
                job.wait(min(wait, 10.0))
            out = job.to_dict()
            if job.status == DONE:
                out["result"] = job.result.view
                out["downloads"] = self._downloads(job)
            return out

        @app.delete("/api/jobs/{job_id}")
        def api_cancel(job_id: str):
            self._job(job_id)
            return self.jobs.cancel(job_id).to_dict()

        @app.get("/api/jobs/{job_id}/report.html")
        def api_report(job_id: str):
            result = self._result(job_id)
            if result.report is None:
                return _err("this result has no HTML report", 404)
            return HTMLResponse(result.report.render(), headers=_attachment(f"{result.name}-report.html"))

        @app.get("/api/jobs/{job_id}/result.json")
        def api_json(job_id: str):
            result = self._result(job_id)
            if result.data is None:
                return _err("this result has no JSON", 404)
            body = json.dumps(result.data, indent=2, ensure_ascii=False)
            return Response(body, media_type="application/json", headers=_attachment(f"{result.name}.json"))

        return app

    def _job(self, job_id: str):
        job = self.jobs.get(job_id)
        if job is None:
            raise BadRequest(f"no job '{job_id}' (finished jobs are kept for a while, then forgotten)", 404)
        return job

    def _result(self, job_id: str) -> Result:
        job = self._job(job_id)
        if job.status != DONE:
            raise BadRequest(f"job '{job_id}' is {job.status}, not done", 409)
        return job.result

    def _downloads(self, job) -> dict:
        out = {}
        if job.result.report is not None:
            out["report.html"] = f"/api/jobs/{job.id}/report.html"
        if job.result.data is not None:
            out["result.json"] = f"/api/jobs/{job.id}/result.json"
        for name in job.result.files or {}:
            out[name] = f"/api/jobs/{job.id}/files/{name}"
        return out


def _attachment(filename: str) -> dict:
    return {"Content-Disposition": f'attachment; filename="{filename}"'}


def create_app(
    models: dict[str, Any],
    limits: Limits | None = None,
    workers: int = 4,
    allowed_hosts: list[str] | None = None,
    dictionaries: dict[str, Any] | None = None,
    upload_dir: str | None = None,
) -> FastAPI:
    """The ASGI app serving ``models`` ({id: LM}); run it with uvicorn or test it with TestClient.

    ``allowed_hosts``: Host header names accepted (None: any); ``lmscope serve`` on 127.0.0.1 passes the
    loopback names. ``dictionaries``: {id: web.features.DictionaryEntry} for the Features tab;
    ``upload_dir``: where uploads get their temporary folders (default: the system's temporary directory)."""
    return App(models, limits, workers, allowed_hosts, dictionaries, upload_dir).build()
