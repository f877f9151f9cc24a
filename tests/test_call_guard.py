"""The watchdog closes a call from outside it: revoked, or silent past its bound.

An in-process simulator stands in for Ollama (it stops generating when its client leaves,
and counts that as a cancellation); no broker, no Redis.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import requests

from app.errors import InstanceSilent, JobCancelled
from app.jobs.call_guard import Call, Watchdog
from app.jobs.ollama_client import OllamaClient
from app.schemas import InferRequest
from app.simulator import FleetThread, SimInstance, SimModel

MODEL = "llama3.2:3b"


@pytest.fixture(scope="module")
def sim() -> Iterator[str]:
    model = SimModel(name=MODEL, tokens_per_second=100.0, load_seconds=0.0)
    instance = SimInstance(name="guard", port=0, models=[model], preloaded=[MODEL])
    with FleetThread([instance]) as fleet:
        yield fleet.url(0)


def _stats(url: str) -> dict:
    return requests.get(url + "/sim/stats", timeout=5).json()


def _faults(url: str, **knobs: object) -> None:
    requests.post(url + "/sim/faults", json=knobs, timeout=5).raise_for_status()


def _long(stream: bool = True) -> InferRequest:
    # 500 tokens at 100/s: 5 s of generation.
    return InferRequest(model=MODEL, prompt="go on", options={"num_predict": 500}, stream=stream)


def _client(url: str) -> OllamaClient:
    return OllamaClient("guard", url, connect_timeout=2, read_timeout=30)


def test_a_revoked_job_s_call_is_closed_mid_generation(sim: str) -> None:
    revoked: set[str] = set()
    watchdog = Watchdog(lambda job: job in revoked)
    call = Call("job-1")
    before = _stats(sim)["cancelled_total"]
    threading.Timer(0.5, revoked.add, ["job-1"]).start()
    started = time.monotonic()
    with watchdog.watching(call), pytest.raises(JobCancelled):
        _client(sim).infer(_long(), call=call)
    assert time.monotonic() - started < 1.0
    assert call.chunks > 10  # it was generating
    time.sleep(0.2)
    assert _stats(sim)["cancelled_total"] == before + 1
    assert _stats(sim)["active"] == 0


def test_a_revoked_job_waiting_for_its_first_token_is_closed(sim: str) -> None:
    """Before the first token there are no headers yet: the socket is closed all the same."""
    _faults(sim, hang=True)
    try:
        revoked: set[str] = set()
        call = Call("job-2")
        threading.Timer(0.3, revoked.add, ["job-2"]).start()
        started = time.monotonic()
        with Watchdog(revoked.__contains__).watching(call), pytest.raises(JobCancelled):
            _client(sim).infer(_long(), call=call)
        assert time.monotonic() - started < 0.8
    finally:
        _faults(sim, hang=False)


def test_a_silent_call_is_cut_after_its_bound_and_a_live_one_is_not(sim: str) -> None:
    watchdog = Watchdog(lambda _job: False)
    # Tokens every 10 ms: a 0.3 s bound between them is never reached.
    live = Call("live", first_s=0.3, gap_s=0.3)
    with watchdog.watching(live):
        reply = _client(sim).infer(
            InferRequest(model=MODEL, prompt="hi", options={"num_predict": 100}), call=live
        )
    assert reply.completion_tokens == 100 and live.reason is None

    _faults(sim, hang=True)
    try:
        silent = Call("silent", first_s=0.3, gap_s=0.3)
        started = time.monotonic()
        with watchdog.watching(silent), pytest.raises(InstanceSilent):
            _client(sim).infer(_long(), call=silent)
        assert 0.3 <= time.monotonic() - started < 0.8
        assert silent.all_silent  # the only call on the instance: the box is what is wrong
    finally:
        _faults(sim, hang=False)


def test_a_call_is_alone_silent_only_if_the_others_are_quiet_too() -> None:
    watchdog = Watchdog(lambda _job: False)
    now = time.monotonic()
    stuck = Call("stuck", first_s=1.0, started=now - 2)
    busy = Call("busy", first_s=1.0, started=now - 2)
    busy.chunk()  # just sent a token
    with watchdog.watching(stuck), watchdog.watching(busy):
        watchdog.check()
    assert stuck.reason == "silent" and not stuck.all_silent
    assert busy.reason is None
