"""Stream a chat through Corral's gateway with the official ``ollama`` client, unchanged.

    OLLAMA_HOST=http://127.0.0.1:11434 .venv/bin/python examples/chat.py "Why is the sky blue?"

The client reads ``OLLAMA_HOST`` (and ``OLLAMA_API_KEY`` when the gateway requires keys) by
itself: this is the code you would run against a single Ollama server.
"""

from __future__ import annotations

import sys

import ollama


def main() -> None:
    question = " ".join(sys.argv[1:]) or "Why is the sky blue?"
    model = "llama3.2:3b"
    for part in ollama.chat(
        model=model, messages=[{"role": "user", "content": question}], stream=True
    ):
        print(part.message.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
