"""What a streaming client has already seen, so a retried job never sends text twice.

A job that fails mid-stream is retried from scratch, on another instance. The relay then
holds the new attempt's chunks after the old one's. :class:`StreamGuard` lets through only
text beyond what the client already has, and checks that the new attempt re-produced that
text exactly before it continues it:

* same prefix (a deterministic request: temperature 0 or a fixed seed): the client sees one
  seamless answer, with a pause while the new attempt catches up;
* different text (sampling): no way to continue without contradicting what was sent, so
  :class:`StreamDiverged` is raised and the caller ends the stream with an error.

Text is tracked per channel: ``response`` and ``thinking`` for generate; ``content``,
``thinking`` and ``tool_calls`` (whole calls, not text) of the message for chat.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

GENERATE_CHANNELS = ("response", "thinking")
CHAT_CHANNELS = ("content", "thinking", "tool_calls")


class StreamDiverged(Exception):
    """A retried attempt's answer differs from the text the client already received."""


class _Channel:
    """One channel: what was sent (``sent``) and how far the current attempt got."""

    def __init__(self, empty: str | list[Any]) -> None:
        self.empty = empty
        self.sent_parts: list[Any] = []
        self.sent_len = 0
        self.current_len = 0
        self.snapshot: str | list[Any] = empty  # all sent text, joined at an attempt change

    def restart(self) -> None:
        self.current_len = 0
        self.snapshot = self._join(self.sent_parts)

    def _join(self, parts: list[Any]) -> str | list[Any]:
        if isinstance(self.empty, str):
            return "".join(parts)
        return [item for part in parts for item in part]

    def feed(self, piece: str | list[Any]) -> str | list[Any]:
        """The part of ``piece`` the client has not seen yet; StreamDiverged on a mismatch."""
        start = self.current_len
        self.current_len += len(piece)
        if start < self.sent_len:  # catching up with text an earlier attempt sent
            overlap = self.snapshot[start : start + len(piece)]
            if piece[: len(overlap)] != overlap:
                raise StreamDiverged(f"the retried attempt differs at position {start}")
            piece = piece[len(overlap) :]
        if piece:
            self.sent_parts.append(piece)
            self.sent_len += len(piece)
        return piece

    @property
    def behind(self) -> bool:
        return self.current_len < self.sent_len


class StreamGuard:
    """Feed it every relayed chunk with its run (attempt and execution); send what it returns."""

    def __init__(self, kind: str) -> None:
        self.chat = kind == "chat"
        names = CHAT_CHANNELS if self.chat else GENERATE_CHANNELS
        self.channels = {n: _Channel([] if n == "tool_calls" else "") for n in names}
        self.run: Hashable = None

    def feed(self, run: Hashable, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk trimmed to what is new (None: nothing new); raises StreamDiverged."""
        if run != self.run:
            self.run = run
            for channel in self.channels.values():
                channel.restart()
        source = (chunk.get("message") or {}) if self.chat else chunk
        fresh = {
            name: channel.feed(source.get(name) or channel.empty)
            for name, channel in self.channels.items()
        }
        done = bool(chunk.get("done"))
        if done and any(c.behind for c in self.channels.values()):
            raise StreamDiverged("the retried attempt ended before re-producing the text sent")
        if not done and not any(fresh.values()):
            return None
        return self._rebuild(chunk, source, fresh)

    def _rebuild(
        self, chunk: dict[str, Any], source: dict[str, Any], fresh: dict[str, Any]
    ) -> dict[str, Any]:
        updated = dict(source)
        for name, part in fresh.items():
            if part or name in ("response", "content"):
                updated[name] = part
            else:
                updated.pop(name, None)
        return {**chunk, "message": updated} if self.chat else updated
