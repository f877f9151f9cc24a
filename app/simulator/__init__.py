"""Ollama simulator: Corral's embedded default backend for the demo and the tests.

It reproduces the Ollama HTTP API closely enough for the official ``ollama`` client, and
Ollama's scheduler (slot semaphore per loaded model, bounded load queue, one load at a time,
eviction, keep-alive), with fault knobs and counters under ``/sim/*``.
"""

from .config import SimInstance, SimModel
from .fleet import FleetThread, default_demo_fleet, load_fleet_file, run_fleet, serve
from .server import build_app

__all__ = [
    "FleetThread",
    "SimInstance",
    "SimModel",
    "build_app",
    "default_demo_fleet",
    "load_fleet_file",
    "run_fleet",
    "serve",
]
