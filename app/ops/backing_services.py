"""RabbitMQ and Redis: check they answer, start them if they are installed but down."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from urllib.parse import urlparse

from app.settings import get_settings

#: How this machine kind starts each service when it is down (the environment's own commands).
START_COMMANDS = {
    "redis": [
        "redis-server",
        "--daemonize",
        "yes",
        "--bind",
        "127.0.0.1",
        "-::1",
        "--port",
        "6379",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        "/var/lib/redis",
        "--logfile",
        "/var/log/redis/ci.log",
    ],
    "rabbitmq": ["rabbitmq-server", "-detached"],
}


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=1
        ):
            return True
    except OSError:
        return False


def ensure_services(start: bool = True, wait: float = 60.0) -> list[str]:
    """Return the problems left; empty when RabbitMQ and Redis both answer."""
    s = get_settings()
    wanted = {"rabbitmq": (s.broker_url, 5672), "redis": (s.redis_url, 6379)}
    problems = []
    for name, (url, port) in wanted.items():
        if _reachable(url, port):
            continue
        command = START_COMMANDS[name]
        local = urlparse(url).hostname in ("127.0.0.1", "localhost", None)
        if not (start and local and shutil.which(command[0])):
            problems.append(
                f"{name} is not reachable at {url}; start it, or set CORRAL_"
                f"{'BROKER_URL' if name == 'rabbitmq' else 'REDIS_URL'}"
            )
            continue
        subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + wait
        while not _reachable(url, port) and time.time() < deadline:
            time.sleep(0.5)
        if not _reachable(url, port):
            problems.append(f"{name} did not come up within {wait:.0f}s after `{command[0]}`")
    return problems
