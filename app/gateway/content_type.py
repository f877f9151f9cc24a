"""Request bodies on Ollama's and OpenAI's paths are JSON, whatever their ``Content-Type``.

Ollama decodes every body as JSON without looking at the header (gin's ``ShouldBindJSON``,
on ``/api/*`` and on its own ``/v1/*`` layer alike), and every ``curl -d`` example in its
documentation relies on it: ``curl -d`` labels the body
``application/x-www-form-urlencoded``. FastAPI parses a body as JSON only when it is labelled
JSON, so this middleware relabels the body before routing and every endpoint, its
validation and its error texts stay as they are.

Corral's own paths (``/jobs``, ``/admin``) keep the strict rule: nothing there needs the
leniency, and a body a browser may send cross-origin without a preflight (form or plain
text) must not reach the admin API of a gateway running without keys.
"""

from __future__ import annotations

from email.message import Message

from starlette.types import ASGIApp, Receive, Scope, Send

#: Paths whose bodies are read as JSON whatever they are labelled.
LENIENT_PREFIXES = ("/api/", "/v1/")
JSON = b"application/json"


def is_json(content_type: bytes) -> bool:
    """``application/json`` or ``application/<anything>+json``, parameters aside."""
    message = Message()
    message["content-type"] = content_type.decode("latin-1")
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


class JsonBodyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(LENIENT_PREFIXES):
            headers = scope["headers"]
            declared = [value for name, value in headers if name == b"content-type"]
            if not declared or not is_json(declared[0]):
                relabelled = [(n, v) for n, v in headers if n != b"content-type"]
                scope = {**scope, "headers": [*relabelled, (b"content-type", JSON)]}
        await self.app(scope, receive, send)
