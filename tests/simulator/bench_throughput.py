"""CPU cost of one simulated request (not collected by pytest: run it directly).

    .venv/bin/python tests/simulator/bench_throughput.py [--requests 2000] [--stream]

Starts one simulator in a subprocess with an instant, preloaded model, sends sequential
non-streaming generate requests through one keep-alive ``requests.Session`` and reports
requests/s plus the server process's CPU time per request.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time

import psutil
import requests

SERVER = """
from app.simulator import SimInstance, SimModel, serve
serve(SimInstance(name="bench", port={port}, preloaded=["m"], models=[SimModel(
    name="m", load_seconds=0, tokens_per_second=0, prompt_tokens_per_second=0)]))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-c", SERVER.format(port=port)])
    try:
        session = requests.Session()
        deadline = time.monotonic() + 15
        while True:
            try:
                session.get(url, timeout=1)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        body = json.dumps({"model": "m", "prompt": "why is the sky blue?", "stream": args.stream})
        proc = psutil.Process(server.pid)
        cpu_before = sum(proc.cpu_times()[:2])
        start = time.perf_counter()
        for _ in range(args.requests):
            reply = session.post(f"{url}/api/generate", data=body, timeout=10)
            reply.raise_for_status()
        elapsed = time.perf_counter() - start
        cpu = sum(proc.cpu_times()[:2]) - cpu_before
        print(
            f"{args.requests} sequential {'streaming' if args.stream else 'non-streaming'} "
            f"generate requests: {args.requests / elapsed:.0f} req/s, "
            f"{elapsed / args.requests * 1000:.3f} ms wall/request, "
            f"server CPU {cpu / args.requests * 1000:.3f} ms/request"
        )
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
