"""Request bodies as real clients send them: the README's curl as written, any Content-Type
on Ollama's and OpenAI's paths, and options Ollama would ignore."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.bench.harness import LocalFleet
from app.errors import InvalidRequest
from app.gateway.content_type import is_json
from tasks import infer
from tests.gateway.conftest import Gateway, start_gateway

pytestmark = pytest.mark.fleet

MODEL = "llama3.2:3b"
EMBED = "nomic-embed-text"
README = Path(__file__).resolve().parents[2] / "README.md"
#: What ``curl -d`` labels a body with, and other labels a hand-written client may send.
NOT_JSON = ["application/x-www-form-urlencoded", "text/plain", "application/octet-stream"]


@pytest.fixture
def http(gateway: Gateway, healthy_fleet: LocalFleet) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, headers=gateway.auth(), timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def open_gateway(fleet: LocalFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway without keys, as ``corral up`` runs the local demo the first tour uses."""
    workdir = tmp_path_factory.mktemp("open-gateway")
    child, url = start_gateway(
        workdir,
        "gateway-open",
        CORRAL_DATABASE_URL=f"sqlite:///{workdir}/open.db",
        CORRAL_GATEWAY_AUTH="false",
    )
    try:
        yield url
    finally:
        child.stop()


def test_what_counts_as_json_already() -> None:
    for label in (b"application/json", b"application/json; charset=utf-8", b"application/x+json"):
        assert is_json(label), label
    for label in (b"application/x-www-form-urlencoded", b"text/plain", b"text/json", b""):
        assert not is_json(label), label


def first_tour_curls() -> list[str]:
    """The curl commands of the README's first tour, exactly as written."""
    text = README.read_text()
    tour = text[text.index("## A first tour") :]
    tour = tour[: tour.index("\n## ", 1)]
    commands = [line.strip() for line in tour.splitlines() if line.strip().startswith("curl ")]
    assert commands, "the first tour has no curl command"
    return commands


def test_the_readmes_curl_works_as_written(open_gateway: str, healthy_fleet: LocalFleet) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("needs curl")
    port = open_gateway.rsplit(":", 1)[1]
    for command in first_tour_curls():
        # Only the port changes: the test gateway is not on Ollama's 11434.
        argv = shlex.split(command.replace("localhost:11434", f"localhost:{port}"))
        assert argv[0] == "curl"
        done = subprocess.run(
            [curl, *argv[1:]], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, (command, done.stderr)
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert lines and "error" not in lines[0], (command, done.stdout)
        assert lines[-1]["done"] is True, done.stdout
        if "/api/chat" in command:  # streamed, as Ollama streams unless told not to
            assert "".join(line["message"]["content"] for line in lines).strip()


@pytest.mark.parametrize("content_type", [None, *NOT_JSON])
def test_ollama_endpoints_read_json_whatever_the_content_type(
    http: httpx.Client, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    for path, body, check in [
        ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": False}, "response"),
        (
            "/api/chat",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False},
            "message",
        ),
        ("/api/embed", {"model": EMBED, "input": ["a"]}, "embeddings"),
        ("/api/embeddings", {"model": EMBED, "prompt": "a"}, "embedding"),
        ("/api/show", {"model": MODEL}, "capabilities"),
    ]:
        reply = http.post(path, content=json.dumps(body), headers=headers)
        assert reply.status_code == 200, (path, reply.text)
        assert reply.json()[check], path
    # Not JSON at all is still refused, as Ollama refuses it.
    bad = http.post("/api/chat", content="model=x", headers=headers)
    assert bad.status_code == 400 and "invalid JSON" in bad.json()["error"]


@pytest.mark.parametrize("content_type", NOT_JSON)
def test_openai_endpoints_read_json_whatever_the_content_type(
    http: httpx.Client, content_type: str
) -> None:
    headers = {"Content-Type": content_type}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    for path, body, check in [
        ("/v1/chat/completions", chat, "choices"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi"}, "choices"),
        ("/v1/embeddings", {"model": EMBED, "input": "a"}, "data"),
    ]:
        reply = http.post(path, content=json.dumps(body), headers=headers)
        assert reply.status_code == 200, (path, reply.text)
        assert reply.json()[check], path


def test_corrals_own_api_keeps_json_only(http: httpx.Client) -> None:
    body = json.dumps({"model": MODEL, "prompt": "hi"})
    plain = http.post("/jobs", content=body, headers={"Content-Type": "text/plain"})
    assert plain.status_code == 400
    labelled = http.post("/jobs", content=body, headers={"Content-Type": "application/json"})
    assert labelled.status_code == 202


def test_unknown_options_are_ignored_by_the_gateway_and_refused_by_infer(
    http: httpx.Client, gateway: Gateway
) -> None:
    since = len(gateway.log_text())
    options = {"temprature": 0, "tfs_z": 1.0, "num_predict": 3, "low_vram": None}
    reply = http.post(
        "/api/generate",
        json={"model": MODEL, "prompt": "hi", "stream": False, "options": options},
    )
    # As Ollama: the known option applies, the others are dropped and logged (null: quietly).
    assert reply.status_code == 200 and reply.json()["eval_count"] == 3
    logged = re.findall(
        r"ignoring options Ollama does not use: ([\w, ]+?) \(", gateway.log_text(since)
    )
    assert logged == ["temprature, tfs_z"]

    # infer() (and POST /jobs, its fields) takes the obsolete one and refuses the misspelt one,
    # saying why the gateway took it.
    assert infer.delay(model=MODEL, prompt="hi", options={"tfs_z": 1.0}).get(timeout=30).text
    with pytest.raises(InvalidRequest, match=r"unknown option 'temprature'.*misspelling"):
        infer.delay(model=MODEL, prompt="hi", options={"temprature": 0})
    job = http.post("/jobs", json={"model": MODEL, "prompt": "hi", "options": options})
    assert job.status_code == 400 and "gateway's Ollama API ignore" in job.json()["error"]
