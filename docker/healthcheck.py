"""Container health checks for docker/compose.yaml: does this container's process serve?

    python docker/healthcheck.py worker NAME    # the instance worker NAME answers a ping
    python docker/healthcheck.py router TIER    # the router of TIER answers a ping
    python docker/healthcheck.py http URL       # URL answers with a status below 500

Exit status 0 means healthy. Workers are pinged by node name through Celery's control
channel (not a process check: a worker cut off from RabbitMQ is running but not healthy).
The node names are the ones ``corral worker`` and ``corral router`` give themselves
(``<ns>.<instance>@<host>``, ``<ns>.router-<tier>.<pid>@<host>``), on this container's host.
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request

#: Seconds to wait for a ping reply or an HTTP answer (compose's own timeout is longer).
TIMEOUT = 5.0


def ping(pattern: str) -> bool:
    from app.celery_app import celery_app

    replies = celery_app.control.ping(pattern=pattern, matcher="glob", timeout=TIMEOUT)
    return bool(replies)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


def main(kind: str, target: str) -> bool:
    if kind == "http":
        return answers(target)
    from app.settings import get_settings

    ns, host = get_settings().namespace, socket.gethostname()
    if kind == "worker":
        return ping(f"{ns}.{target}@{host}")
    if kind == "router":
        return ping(f"{ns}.router-{target}.*@{host}")
    raise SystemExit(f"unknown check {kind!r}: use worker, router or http")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(0 if main(sys.argv[1], sys.argv[2]) else 1)
