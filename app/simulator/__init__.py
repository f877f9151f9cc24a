"""Ollama simulator: Corral's embedded default backend for the demo and the tests.

It reproduces the Ollama HTTP API closely enough for the official ``ollama`` client, and
Ollama's scheduler (slot semaphore per loaded model, bounded load queue, one load at a time,
eviction, keep-alive), with fault knobs and counters under ``/sim/*``.

Eviction follows both of Ollama's limits: ``max_loaded_models`` (OLLAMA_MAX_LOADED_MODELS)
and, when an instance sets ``memory_bytes``, memory: a model loads only if its
``size_bytes`` fits in what the loaded models leave, idle models are evicted until it
does, busy ones are waited for, and a model larger than the whole memory gets Ollama's
500 ``model requires more system memory (…) than is available (…)``.  Without
``memory_bytes`` only the count limits.
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
