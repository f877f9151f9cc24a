"""The type of the gateway's way to run a blocking call off the event loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class Blocking(Protocol):
    """Runs ``fn(*args, **kwargs)`` in the gateway's thread pool (``JobClient.blocking``)."""

    def __call__(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Awaitable[T]: ...
