"""``corral up``, the README's first command, as a newcomer runs it: the simulated fleet, the
routers, the gateway on Ollama's port, and everything stopped again by SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from app.bench.harness import ROOT, wait_until

pytestmark = pytest.mark.fleet

GATEWAY = 11434
SIM_PORTS = (11501, 11502, 11503)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_serves_the_ollama_client_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    busy = [p for p in (GATEWAY, *SIM_PORTS) if _listening(p)]
    if busy:
        pytest.skip(f"ports {busy} are taken (a stack already running here?)")
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_INSTANCES"}
    env["CORRAL_NAMESPACE"] = f"up{os.getpid()}"
    env["CORRAL_DATABASE_URL"] = f"sqlite:///{tmp_path}/corral.db"
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "up", "--demo-jobs", "0", "--no-flower"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "Corral is up" in log.read_text(), 90, "corral up to be ready")
        chat = subprocess.run(
            [sys.executable, "examples/chat.py", "Why is the sky blue?"],
            cwd=ROOT,
            env=env | {"OLLAMA_HOST": f"http://127.0.0.1:{GATEWAY}"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert chat.returncode == 0, chat.stderr
        assert len(chat.stdout.split()) > 3, chat.stdout
    finally:
        # Known by PID now, so that even a `corral up` that failed to stop them leaves none.
        children = psutil.Process(up.pid).children(recursive=True)
        up.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        up.send_signal(signal.SIGTERM)  # impatient: a second one must not orphan anything
        up.wait(60)
        orphans = []
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE:
                    orphans.append(" ".join(child.cmdline()[-3:]))
                    child.kill()
    assert not orphans, f"left running after SIGTERM: {orphans}"
    assert "all processes stopped" in log.read_text()
    wait_until(
        lambda: not any(_listening(p) for p in (GATEWAY, *SIM_PORTS)), 20, "the ports to close"
    )
