"""The worker's HTTP endpoints (aiohttp.web): liveness, readiness and Prometheus metrics.

- ``GET /healthz``: 200 while the worker's loops tick (never asks the database or the API: an
  outage must not get every worker restarted), else 503.
- ``GET /readyz``: 200 when the store answers and the worker is not stopping, else 503.
- ``GET /metrics``: the worker's own registry in the Prometheus text format.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from orchestrator.errors import ConfigError
from orchestrator.worker import Worker

__all__ = ["parse_address", "serve_http"]


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; port 0 picks a free one) as a pair.

    Raises:
        errors.ConfigError: not of that form.
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"the HTTP address must be HOST:PORT, e.g. 127.0.0.1:9090, not {text!r}")
    return host, int(port)


@contextlib.asynccontextmanager
async def serve_http(worker: Worker, host: str, port: int) -> AsyncIterator[tuple[str, int]]:
    """Serve the worker's endpoints on ``host:port`` for the block; yields the bound address.

    Args:
        worker: the worker to report on.
        host: the interface to listen on.
        port: the port; 0 picks a free one.
    """

    async def healthz(request: web.Request) -> web.Response:
        ok = worker.healthy()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "stalled\n")

    async def readyz(request: web.Request) -> web.Response:
        ok = await worker.ready()
        return web.Response(status=200 if ok else 503, text="ready\n" if ok else "not ready\n")

    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(body=worker.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as error:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {error.strerror or error}; pick another address"
            ) from None
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[:2] if sockets else (host, port)
        yield str(bound[0]), int(bound[1])
    finally:
        await runner.cleanup()
