"""HTTP on RUNNERD_HTTP_PORT, served from the daemon's own event loop (aiohttp):

    GET /healthz  liveness: 200 while the loop answers and the zygote is alive, else 503
    GET /readyz   readiness: 200 only when Redis answers, the zygote is up, the required sandbox
                  layers are present and the worker is not draining; the body says which failed
    GET /metrics  Prometheus text format

Handlers do no heavy work: a scrape renders counters already kept, plus one PING for /readyz
(bounded by a timeout), so the endpoints keep answering while the worker is saturated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from runnerd.metrics import Metrics

READY_PING_TIMEOUT_S = 1.0


@dataclass
class HealthSource:
    """What the endpoints ask the worker; plain callables keep http.py free of daemon imports."""

    zygote_alive: Callable[[], bool]
    redis_ping: Callable[[], Awaitable[object]]
    missing_layers: Callable[[], list[str]]
    draining: Callable[[], bool]


def build_app(metrics: Metrics, health: HealthSource) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        alive = health.zygote_alive()
        body = {"status": "ok" if alive else "failing", "zygote": alive}
        return web.json_response(body, status=200 if alive else 503)

    async def readyz(_: web.Request) -> web.Response:
        checks = {
            "redis": await _redis_ok(health),
            "zygote": health.zygote_alive(),
            "sandbox_layers": not health.missing_layers(),
            "not_draining": not health.draining(),
        }
        ready = all(checks.values())
        body: dict[str, object] = {"status": "ready" if ready else "not ready", "checks": checks}
        if not checks["sandbox_layers"]:
            body["missing_layers"] = health.missing_layers()
        return web.json_response(body, status=200 if ready else 503)

    async def metrics_text(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)
    return app


async def _redis_ok(health: HealthSource) -> bool:
    try:
        async with asyncio.timeout(READY_PING_TIMEOUT_S):
            await health.redis_ping()
    except Exception:  # noqa: BLE001 - any failure to answer means "not ready"
        return False
    return True


async def start(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()  # a busy port: nothing left open to be warned about at exit
        raise
    return runner
