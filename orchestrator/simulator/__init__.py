"""The bundled Dotdigital Insight data import API simulator: a local server and test oracle.

It imports nothing from the client, the engine or the record rules, so a mistake in one is caught by
the other. ``async with Simulator(SimulatorConfig(...), faults=Faults(...)) as sim:`` serves the API
at ``sim.base_url``; :func:`serve` runs it until cancelled; :func:`make_app` builds the bare
``aiohttp.web.Application``.
"""

from __future__ import annotations

from .app import (
    STATE_KEY,
    Faults,
    ImportStats,
    Simulator,
    SimulatorConfig,
    SimulatorState,
    SimulatorStats,
    make_app,
    serve,
)

__all__ = [
    "STATE_KEY",
    "Faults",
    "ImportStats",
    "Simulator",
    "SimulatorConfig",
    "SimulatorState",
    "SimulatorStats",
    "make_app",
    "serve",
]
