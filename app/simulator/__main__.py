"""``python -m app.simulator``: serve simulated Ollama servers until Ctrl+C.

python -m app.simulator --fleet fleet.toml
python -m app.simulator --demo --port 11434
python -m app.simulator --port 11434 --model llama3.2:3b --model nomic-embed-text:embed
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .config import SimInstance, SimModel
from .fleet import default_demo_fleet, load_fleet_file, run_fleet


def parse_model(spec: str) -> SimModel:
    """``NAME[:TAG][:chat|:embed]``; without a kind, names containing "embed" are embedders."""
    name, _, kind = spec.rpartition(":")
    match kind:
        case "chat" | "embed":
            return SimModel(name=name, kind=kind)
        case _:
            return SimModel(name=spec, kind="embed" if "embed" in spec else "chat")


def build_instances(argv: Sequence[str] | None = None) -> list[SimInstance]:
    parser = argparse.ArgumentParser(
        prog="python -m app.simulator", description="Simulated Ollama servers for Corral."
    )
    parser.add_argument("--fleet", help="TOML fleet file of [[instance]] tables")
    parser.add_argument("--demo", action="store_true", help="3-instance demo fleet from --port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--name", default="sim")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME[:TAG][:KIND]",
        help="model to serve (repeatable); KIND is chat or embed",
    )
    parser.add_argument("--preload", action="append", default=[], metavar="NAME")
    parser.add_argument("--num-parallel", type=int, default=2)
    parser.add_argument("--max-loaded-models", type=int, default=3)
    parser.add_argument(
        "--memory-bytes", type=int, default=None, help="memory for loaded models (none: no limit)"
    )
    parser.add_argument("--max-queue", type=int, default=512)
    parser.add_argument("--speed", type=float, default=1.0)
    args = parser.parse_args(argv)

    if args.fleet:
        return load_fleet_file(args.fleet)
    if args.demo:
        return default_demo_fleet(args.port)
    models = [parse_model(spec) for spec in args.model] or default_demo_fleet()[0].models
    return [
        SimInstance(
            name=args.name,
            host=args.host,
            port=args.port,
            num_parallel=args.num_parallel,
            max_loaded_models=args.max_loaded_models,
            memory_bytes=args.memory_bytes,
            max_queue=args.max_queue,
            speed=args.speed,
            models=models,
            preloaded=args.preload,
        )
    ]


def main(argv: Sequence[str] | None = None) -> None:
    instances = build_instances(argv)
    for instance in instances:
        names = ", ".join(m.name for m in instance.models)
        print(
            f"{instance.name}: http://{instance.host}:{instance.port} ({names})",
            file=sys.stderr,
        )
    run_fleet(instances)


if __name__ == "__main__":
    main()
