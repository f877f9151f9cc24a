"""The libraries people build on Ollama's and OpenAI's APIs, through the gateway.

LangChain's Ollama and OpenAI integrations and LlamaIndex's Ollama integration, at the
versions pinned in the ``test`` extra, each pointed at the gateway as at one Ollama server
(or at OpenAI): chat, streaming, embeddings and a tool call. They send what the official
clients do not: LangChain sends options Ollama no longer uses (``tfs_z``, ``mirostat``), and
every library reads a tool call from a streamed chat. The simulator calls a tool when the
prompt names it (``app.simulator.tools``), with a placeholder of the right type per argument.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator

import pytest

from app.bench.harness import LocalFleet, wait_until
from app.observe.metrics import IGNORED_OPTIONS
from app.state import keys
from app.state.fleet import fleet_state
from tests.gateway.conftest import Gateway

pytestmark = pytest.mark.fleet

MODEL = "llama3.2:3b"
EMBED = "nomic-embed-text"
ASK_FOR_WEATHER = "What is the weather in Paris? Use get_weather."


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@pytest.fixture
def fleet_ready(gateway: Gateway, healthy_fleet: LocalFleet) -> Iterator[Gateway]:
    yield gateway


def _unit(vector: list[float]) -> bool:
    return math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-3)


def _ignored(option: str) -> float:
    """corral_ignored_options_total{option} as summed in Redis (0 before the first)."""
    fleet = fleet_state()
    key = keys.metrics(fleet.ns, IGNORED_OPTIONS.name)
    return float(fleet.redis.hget(key, json.dumps([option])) or 0)


# LangChain, Ollama's API ---------------------------------------------------------------


def _chat_ollama(gateway: Gateway, **kwargs: object):
    from langchain_ollama import ChatOllama

    return ChatOllama(
        model=MODEL, base_url=gateway.url, client_kwargs={"headers": gateway.auth()}, **kwargs
    )


def test_langchain_ollama_chat_and_stream(fleet_ready: Gateway) -> None:
    llm = _chat_ollama(fleet_ready, temperature=0)
    prompt = "Why is the sky blue? (LangChain, Ollama)"
    chunks = list(llm.stream(prompt))
    assert sum(1 for c in chunks if c.content) > 2
    # temperature 0: the same answer given whole (from the cache, which the stream filled).
    reply = llm.invoke(prompt)
    assert reply.content == "".join(c.content for c in chunks)
    assert reply.response_metadata["model"] == MODEL
    assert reply.usage_metadata["output_tokens"] > 0


def test_langchain_ollama_embeddings_with_options_ollama_ignores(fleet_ready: Gateway) -> None:
    from langchain_ollama import OllamaEmbeddings

    auth = {"headers": fleet_ready.auth()}
    before, log_from = _ignored("tfs_z"), len(fleet_ready.log_text())
    # What the issue saw refused: LangChain sends tfs_z and mirostat (here with values set).
    embedder = OllamaEmbeddings(
        model=EMBED, base_url=fleet_ready.url, client_kwargs=auth, tfs_z=1.0, mirostat=0
    )
    vectors = embedder.embed_documents(["a", "b"])
    assert len(vectors) == 2 and vectors[0] != vectors[1]
    assert all(_unit(v) for v in vectors)
    assert embedder.embed_query("a") == vectors[0]
    log = fleet_ready.log_text(log_from)
    assert "ignoring options Ollama does not use: mirostat, tfs_z" in log
    # One per request that carried it, written within the gateway's metrics flush interval.
    wait_until(lambda: _ignored("tfs_z") >= before + 2, 10, "the ignored options counted")
    time.sleep(1.0)  # and no more after another flush
    assert _ignored("tfs_z") == before + 2
    # Its defaults (all options sent as null) are no news: accepted without a warning.
    quiet_from = len(fleet_ready.log_text())
    default = OllamaEmbeddings(model=EMBED, base_url=fleet_ready.url, client_kwargs=auth)
    assert default.embed_documents(["a", "b"]) == vectors
    assert "ignoring options" not in fleet_ready.log_text(quiet_from)


def test_langchain_ollama_tool_call(fleet_ready: Gateway) -> None:
    llm = _chat_ollama(fleet_ready).bind_tools([get_weather])
    reply = llm.invoke(ASK_FOR_WEATHER)
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("get_weather", {"city": "sim"})]
    # The tool's answer goes back; the model then answers in text.
    messages = [
        ("user", ASK_FOR_WEATHER),
        reply,
        {"role": "tool", "content": "sunny", "tool_call_id": reply.tool_calls[0]["id"]},
    ]
    final = llm.invoke(messages)
    assert final.content and not final.tool_calls


# LangChain, OpenAI's API ---------------------------------------------------------------


def _chat_openai(gateway: Gateway, **kwargs: object):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=MODEL,
        base_url=gateway.url + "/v1",
        api_key=gateway.key,
        max_retries=0,
        timeout=30,
        **kwargs,
    )


def test_langchain_openai_chat_stream_and_usage(fleet_ready: Gateway) -> None:
    llm = _chat_openai(fleet_ready, temperature=0, stream_usage=True)
    prompt = "Why is the sky blue? (LangChain, OpenAI)"
    chunks = list(llm.stream(prompt))
    assert sum(1 for c in chunks if c.content) > 2
    reply = llm.invoke(prompt)
    assert reply.content == "".join(c.content for c in chunks)
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert usage and usage[-1]["output_tokens"] == reply.usage_metadata["output_tokens"] > 0


def test_langchain_openai_tool_call_streamed_and_not(fleet_ready: Gateway) -> None:
    llm = _chat_openai(fleet_ready).bind_tools([get_weather])
    reply = llm.invoke(ASK_FOR_WEATHER)
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("get_weather", {"city": "sim"})]
    streamed = None
    for chunk in llm.stream(ASK_FOR_WEATHER):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [
        ("get_weather", {"city": "sim"})
    ]


def test_langchain_openai_embeddings(fleet_ready: Gateway) -> None:
    from langchain_openai import OpenAIEmbeddings

    embedder = OpenAIEmbeddings(
        model=EMBED,
        base_url=fleet_ready.url + "/v1",
        api_key=fleet_ready.key,
        max_retries=0,
        # By default it tokenizes with tiktoken (a download) for OpenAI's own models.
        check_embedding_ctx_length=False,
    )
    vectors = embedder.embed_documents(["a", "b"])
    assert len(vectors) == 2 and vectors[0] != vectors[1] and all(_unit(v) for v in vectors)


# LlamaIndex, Ollama's API --------------------------------------------------------------


def _llama_index(gateway: Gateway, **kwargs: object):
    from llama_index.llms.ollama import Ollama

    return Ollama(
        model=MODEL,
        base_url=gateway.url,
        request_timeout=30,
        headers=gateway.auth(),
        context_window=4096,  # else it asks /api/show for it
        **kwargs,
    )


def test_llama_index_chat_complete_and_stream(fleet_ready: Gateway) -> None:
    from llama_index.core.llms import ChatMessage

    llm = _llama_index(fleet_ready, temperature=0)
    prompt = "Why is the sky blue? (LlamaIndex)"
    deltas = [r.delta for r in llm.stream_complete(prompt) if r.delta]
    assert len(deltas) > 2
    assert llm.complete(prompt).text == "".join(deltas)
    # (LlamaIndex completes with /api/chat: another prompt, or the cache would answer.)
    messages = [ChatMessage(role="user", content=prompt + " in chat")]
    streamed = list(llm.stream_chat(messages))
    assert sum(1 for r in streamed if r.delta) > 2
    chat = llm.chat(messages)
    assert chat.message.role == "assistant"
    assert chat.message.content == streamed[-1].message.content


def test_llama_index_tool_call(fleet_ready: Gateway) -> None:
    from llama_index.core.tools import FunctionTool

    llm = _llama_index(fleet_ready)
    tool = FunctionTool.from_defaults(fn=get_weather)
    reply = llm.chat_with_tools([tool], user_msg=ASK_FOR_WEATHER)
    calls = llm.get_tool_calls_from_response(reply, error_on_no_tool_call=True)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("get_weather", {"city": "sim"})]
    assert tool.call(**calls[0].tool_kwargs).content == "sunny in sim"


def test_llama_index_embeddings(fleet_ready: Gateway) -> None:
    from llama_index.embeddings.ollama import OllamaEmbedding

    embedder = OllamaEmbedding(
        model_name=EMBED, base_url=fleet_ready.url, client_kwargs={"headers": fleet_ready.auth()}
    )
    vectors = embedder.get_text_embedding_batch(["a", "b"])
    assert len(vectors) == 2 and vectors[0] != vectors[1] and all(_unit(v) for v in vectors)
    assert embedder.get_query_embedding("a") == vectors[0]
