"""`create_app(settings)`: the FastAPI application over one store and one model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import APIRouter, FastAPI, Security

from .engine import Engine
from .errors import install_error_handlers
from .jobs import JobManager
from .limits import BodySizeLimit, JsonBodiesOnly
from .routers import audit, drift, examples, forget, health, influence, jobs, stats
from .security import ApiKeyAuth, api_key_header, key_digests
from .settings import Settings

API_VERSION = "1.0.0"
DESCRIPTION = """\
Look stored training examples up, ask which examples influenced a text, and forget examples on request
(GDPR erasure) from a model trained with gradient capture into a gradstore.

Every `/v1` endpoint needs an API key in the `X-API-Key` header. Forgets are asynchronous jobs: `POST
/v1/forget` answers 202 with a job to poll at `GET /v1/jobs/{job_id}`. Jobs are journaled in the store and
survive restarts; a crash leaves the model on disk exactly as before or as after a job, never between.
"""


def create_app(settings: Settings) -> FastAPI:
    """The application. Opening the store and the model happens at startup (the ASGI lifespan)."""
    engine = Engine(settings)
    manager = JobManager(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loading weights and settling the journal are blocking: off the event loop, like everything else.
        # (`gradstore serve` starts both before it binds its socket; starting again is a no-op.)
        await to_thread.run_sync(engine.start)
        try:
            await to_thread.run_sync(manager.start)
            yield
        finally:
            await to_thread.run_sync(manager.stop)
            engine.stop()

    app = FastAPI(title="gradstore", version=API_VERSION, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.jobs = manager
    install_error_handlers(app)
    # The last added runs first: the key is checked before the body's type, and both before its size, so
    # a request that would be refused anyway is never read.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(JsonBodiesOnly)
    app.add_middleware(ApiKeyAuth, digests=key_digests(settings.api_keys))

    app.include_router(health.router)
    # `ApiKeyAuth` checks the key; the dependency only declares the scheme in the OpenAPI schema.
    v1 = APIRouter(prefix="/v1", dependencies=[Security(api_key_header)])
    for module in (stats, examples, influence, forget, jobs, audit, drift):
        v1.include_router(module.router)
    app.include_router(v1)
    return app
