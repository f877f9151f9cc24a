"""Configuration, fleet files, the CLI and the Go-compatible parsing helpers."""

from __future__ import annotations

import math

import pydantic
import pytest

from app.simulator import SimInstance, SimModel, default_demo_fleet, load_fleet_file
from app.simulator.__main__ import build_instances, parse_model
from app.simulator.config import normalize_name
from app.simulator.protocol import HTTPError, parse_go_duration, parse_keep_alive


@pytest.mark.parametrize(
    ("name", "normalized"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("llama3.2:3b", "llama3.2:3b"),
        ("registry.local:5000/team/model", "registry.local:5000/team/model:latest"),
    ],
)
def test_model_names_get_a_tag(name, normalized):
    assert normalize_name(name) == normalized
    assert SimModel(name=name).name == normalized


def test_instance_validation():
    with pytest.raises(pydantic.ValidationError, match="twice"):
        SimInstance(name="x", port=1, models=[SimModel(name="a"), SimModel(name="a:latest")])
    with pytest.raises(pydantic.ValidationError, match="unknown"):
        SimInstance(name="x", port=1, models=[SimModel(name="a")], preloaded=["b"])
    with pytest.raises(pydantic.ValidationError):
        SimInstance(name="x", port=1, error_rate=1.5)
    assert SimInstance(
        name="x", port=1, models=[SimModel(name="a")], preloaded=["a"]
    ).preloaded == ["a:latest"]


def test_fleet_file(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text(
        """
[[instance]]
name = "sim-a"
port = 12001
num_parallel = 4
speed = 0.5
preloaded = ["llama3.2:3b"]

[[instance.model]]
name = "llama3.2:3b"
load_seconds = 1.5

[[instance.model]]
name = "nomic-embed-text"
kind = "embed"

[[instance]]
name = "sim-b"
port = 12002
"""
    )
    first, second = load_fleet_file(path)
    assert (first.name, first.port, first.num_parallel, first.speed) == ("sim-a", 12001, 4, 0.5)
    assert [(m.name, m.kind) for m in first.models] == [
        ("llama3.2:3b", "chat"),
        ("nomic-embed-text:latest", "embed"),
    ]
    assert first.models[0].load_seconds == 1.5
    assert (second.name, second.models) == ("sim-b", [])


def test_demo_fleet():
    fleet = default_demo_fleet(base_port=20000)
    assert [(i.name, i.port, i.num_parallel) for i in fleet] == [
        ("sim-a", 20000, 2),
        ("sim-b", 20001, 2),
        ("sim-c", 20002, 2),
    ]
    assert [i.preloaded for i in fleet] == [["llama3.2:3b"], ["llama3.2:3b"], []]
    models = {m.name: m for m in fleet[0].models}
    assert models["nomic-embed-text:latest"].kind == "embed"
    assert models["nomic-embed-text:latest"].embedding_length == 768
    assert models["qwen2.5:7b"].tokens_per_second < models["llama3.2:3b"].tokens_per_second


def test_cli():
    assert parse_model("nomic-embed-text:embed") == SimModel(name="nomic-embed-text", kind="embed")
    assert parse_model("llama3.2:3b") == SimModel(name="llama3.2:3b")
    assert parse_model("mxbai-embed-large").kind == "embed"
    (instance,) = build_instances(
        ["--port", "11500", "--model", "llama3.2:3b", "--model", "nomic-embed-text:embed"]
    )
    assert instance.port == 11500
    assert [m.name for m in instance.models] == ["llama3.2:3b", "nomic-embed-text:latest"]
    assert len(build_instances(["--demo", "--port", "11600"])) == 3


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("5m", 300.0), ("1h30m", 5400.0), ("300ms", 0.3), ("-1s", -1.0), ("1.5h", 5400.0)],
)
def test_go_durations(text, seconds):
    assert math.isclose(parse_go_duration(text), seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("300", 'time: missing unit in duration "300"'),
        ("abc", 'time: invalid duration "abc"'),
        ("5y", 'time: unknown unit "y" in duration "5y"'),
        (True, "Unsupported type: 'bool'"),
    ],
)
def test_bad_keep_alive(value, message):
    with pytest.raises(HTTPError) as error:
        parse_keep_alive(value)
    assert (error.value.status, error.value.message) == (400, message)


def test_keep_alive_values():
    assert parse_keep_alive(None) is None
    assert parse_keep_alive(10.9) == 10.0  # Go truncates to whole seconds
    assert parse_keep_alive(-1) == math.inf
    assert parse_keep_alive("-5m") == math.inf


def test_memory_bytes_from_a_fleet_file_and_checked_against_preloads(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text(
        """
[[instance]]
name = "sim-a"
port = 12001
memory_bytes = 3_000_000_000

[[instance]]
name = "sim-b"
port = 12002
"""
    )
    first, second = load_fleet_file(path)
    assert (first.memory_bytes, second.memory_bytes) == (3_000_000_000, None)
    with pytest.raises(pydantic.ValidationError, match="memory_bytes"):
        SimInstance(
            name="x",
            port=1,
            memory_bytes=3,
            models=[SimModel(name="a", size_bytes=2), SimModel(name="b", size_bytes=2)],
            preloaded=["a", "b"],
        )
    assert build_instances(["--memory-bytes", "5"])[0].memory_bytes == 5
