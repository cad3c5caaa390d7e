"""Comparison receiver: the "textbook" stack - FastAPI + pydantic v2 + arq ``enqueue_job``.

Same contract as examhook's receiver: Basic auth, validate the whole Synap body
(the pydantic models are generated from examhook's msgspec Structs, so both validate
exactly the same fields), dedup by event id (arq's ``_job_id``), queue a job carrying
the body, answer 202 once Redis confirmed (200 for a duplicate).

    BENCH_REDIS_URL=redis://127.0.0.1:PORT/0 python bench/fastapi_app.py --port 8080
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Union

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
from arq import create_pool
from arq.connections import RedisSettings
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from shared.payload import ExamResultsReleased

USER, PASSWORD = os.environ.get("BENCH_USER", "synap"), os.environ.get("BENCH_PASSWORD", "s3cret")
EXPECTED = f"{USER}:{PASSWORD}".encode()

# -- pydantic models mirroring shared/payload.py ------------------------------------------

_models: dict[type, type[BaseModel]] = {}


class _Base(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


def _py_type(t: msgspec.inspect.Type) -> Any:
    mi = msgspec.inspect
    if isinstance(t, mi.StrType):
        return str
    if isinstance(t, mi.FloatType):
        return float
    if isinstance(t, mi.IntType):
        return int
    if isinstance(t, mi.BoolType):
        return bool
    if isinstance(t, mi.NoneType):
        return type(None)
    if isinstance(t, mi.ListType):
        return list[_py_type(t.item_type)]  # type: ignore[misc]
    if isinstance(t, mi.DictType):
        return dict[_py_type(t.key_type), _py_type(t.value_type)]  # type: ignore[misc]
    if isinstance(t, mi.UnionType):
        return Union[tuple(_py_type(x) for x in t.types)]  # noqa: UP007
    if isinstance(t, mi.StructType):
        return _model(t)
    raise TypeError(f"unsupported type {t!r}")


def _model(info: msgspec.inspect.StructType) -> type[BaseModel]:
    if info.cls in _models:
        return _models[info.cls]
    fields: dict[str, Any] = {}
    for f in info.fields:
        typ = _py_type(f.type)
        if f.required:
            fields[f.name] = (typ, Field(alias=f.encode_name))
        elif f.default is not msgspec.NODEFAULT:
            default = f.default
            if isinstance(default, msgspec.Struct):
                fields[f.name] = (
                    typ,
                    Field(
                        alias=f.encode_name,
                        default_factory=lambda d=default: _model(msgspec.inspect.type_info(type(d)))(),
                    ),
                )
            else:
                fields[f.name] = (typ, Field(alias=f.encode_name, default=default))
        else:
            fields[f.name] = (typ | None, Field(alias=f.encode_name, default_factory=f.default_factory))
    model = create_model(info.cls.__name__, __base__=_Base, **fields)
    _models[info.cls] = model
    return model


Payload = _model(msgspec.inspect.type_info(ExamResultsReleased))  # type: ignore[arg-type]

# -- the app ------------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
    app.state.arq = await create_pool(RedisSettings.from_dsn(os.environ["BENCH_REDIS_URL"]))
    yield
    await app.state.arq.aclose()


app = FastAPI(lifespan=lifespan)


def _authorized(header: str | None) -> bool:
    if not header or header[:6].lower() != "basic ":
        return False
    try:
        return hmac.compare_digest(base64.b64decode(header[6:], validate=True), EXPECTED)
    except ValueError:
        return False


@app.post("/webhooks/exam-results-released")
async def receive(request: Request, event: Payload) -> JSONResponse:  # type: ignore[valid-type]
    if not _authorized(request.headers.get("authorization")):
        return JSONResponse({"error": "unauthorized"}, 401, headers={"WWW-Authenticate": "Basic"})
    material = "\x1f".join((event.meta.event_name, event.attempt.id, event.attempt.audit.released_at))
    event_id = "evt_" + hashlib.sha256(material.encode()).hexdigest()[:32]
    body = await request.body()  # cached by FastAPI: the raw body, as received
    job = await request.app.state.arq.enqueue_job("handle_event", body, _job_id=event_id)
    if job is None:
        return JSONResponse({"status": "duplicate", "event_id": event_id}, 200)
    return JSONResponse({"status": "accepted", "event_id": event_id}, 202)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
