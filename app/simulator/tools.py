"""Tool calls, as a tools-capable model behind Ollama's parser makes them.

A real model decides for itself whether to call a tool; the simulator needs a rule a test
can steer: it calls a tool when the chat request offers ``tools`` and the last message is
the user's and names one of them (``"What is the weather in Paris? use get_weather"``).
After a ``tool`` message it answers in text, as a model does once it has the result.

The call has Ollama's shape (``api.ToolCall``, ``server/routes.go``): an ``id`` of
``call_`` and 8 characters of ``[a-z0-9]``, ``function.index``, ``function.name`` and
``function.arguments`` as a JSON object (not a string), one value per required parameter
of the right JSON type. The chunk holding it comes before the final line, whose message has
no tool calls: the parser buffers a call and sends it whole.
"""

from __future__ import annotations

import hashlib
import string
from typing import Any

from .protocol import HTTPError, field

_ID_ALPHABET = string.ascii_lowercase + string.digits

#: A placeholder of each JSON-schema type, for a parameter without ``enum``.
_PLACEHOLDERS: dict[str, Any] = {
    "string": "sim",
    "integer": 1,
    "number": 1.5,
    "boolean": True,
    "array": [],
    "object": {},
}


def tool_calls(body: dict[str, Any], messages: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The calls the model makes for this chat request (none: it answers in text)."""
    tools = field(body, "tools", list, "ChatRequest", "api.Tools") or []
    if not tools or not messages or messages[-1][0] != "user":
        return []
    prompt = messages[-1][1]
    calls: list[dict[str, Any]] = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise HTTPError(400, "invalid tool: each tool needs function.name")
        name = function["name"]
        if name and name in prompt:
            calls.append(
                {
                    "id": _call_id(prompt, name),
                    "function": {
                        "index": len(calls),
                        "name": name,
                        "arguments": _arguments(function.get("parameters")),
                    },
                }
            )
    return calls


def _call_id(*key: str) -> str:
    """``call_`` and 8 of ``[a-z0-9]``, as Ollama's ``toolCallId`` (here stable per request)."""
    digest = hashlib.blake2b("\x1f".join(key).encode(), digest_size=8).digest()
    return "call_" + "".join(_ID_ALPHABET[b % len(_ID_ALPHABET)] for b in digest)


def _arguments(parameters: Any) -> dict[str, Any]:
    if not isinstance(parameters, dict):
        return {}
    properties = parameters.get("properties") or {}
    required = parameters.get("required") or list(properties)
    arguments = {}
    for name in required:
        schema = properties.get(name) or {}
        if schema.get("enum"):
            arguments[name] = schema["enum"][0]
        else:
            kind = schema.get("type", "string")
            kind = kind[0] if isinstance(kind, list) and kind else kind
            arguments[name] = _PLACEHOLDERS.get(kind, "sim")
    return arguments
