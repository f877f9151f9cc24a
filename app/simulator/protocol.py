"""Wire details of the Ollama API: Go-flavoured validation errors, durations, timestamps.

Real Ollama is a Go server, so clients (and routers that classify errors) see Go's
``encoding/json`` and ``time.ParseDuration`` messages.  This module reproduces the ones a
client can realistically trigger.
"""

from __future__ import annotations

import json
import math
import re
import time
from datetime import datetime, timedelta
from typing import Any

dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
"""Compact JSON like Go's ``c.JSON``; a prebuilt encoder avoids json.dumps' per-call setup."""

FOREVER = math.inf
"""keep_alive of a model that never expires (a negative keep_alive in the request)."""

# Go turns a negative keep_alive into math.MaxInt64 nanoseconds, ~292 years.
_GO_MAX_DURATION_S = 9_223_372_036.854775807

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)([^\d.]*)")


# Python's JSONDecodeError.msg -> the context phrase of Go's SyntaxError text.
_JSON_ERROR_CONTEXT = {
    "Expecting value": "looking for beginning of value",
    "Expecting property name enclosed in double quotes": (
        "looking for beginning of object key string"
    ),
    "Expecting ':' delimiter": "after object key",
    "Expecting ',' delimiter": "after object key:value pair",
    "Extra data": "after top-level value",
}


class HTTPError(Exception):
    """An error answered as ``{"error": message}`` with ``status``, before any body was sent."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_body(raw: bytes, go_type: str) -> dict[str, Any]:
    """Decode a request body, failing with the texts gin's ``ShouldBindJSON`` produces."""
    if not raw.strip():
        raise HTTPError(400, "missing request body")
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(exc.doc.rstrip()):
            raise HTTPError(400, "unexpected EOF") from None
        where = _JSON_ERROR_CONTEXT.get(exc.msg, "looking for beginning of value")
        raise HTTPError(400, f"invalid character {exc.doc[exc.pos]!r} {where}") from None
    except UnicodeDecodeError:
        raise HTTPError(400, "invalid character looking for beginning of value") from None
    if not isinstance(body, dict):
        raise HTTPError(
            400, f"json: cannot unmarshal {go_kind(body)} into Go value of type {go_type}"
        )
    return body


def go_kind(value: object) -> str:
    """The JSON kind name encoding/json uses in its type errors."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def field(body: dict[str, Any], key: str, kind: type, go_struct: str, go_type: str) -> Any:
    """Return ``body[key]`` (or None) after checking it has the JSON kind the Go struct expects."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise HTTPError(
            400,
            f"json: cannot unmarshal {go_kind(value)} into Go struct field "
            f"{go_struct}.{key} of type {go_type}",
        )
    return value


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string (``"5m"``, ``"1h30m"``, ``"-1s"``, ``"0"``)."""
    quoted = json.dumps(text)
    rest = text.lstrip("+-")
    negative = text.startswith("-")
    if rest == "0":
        return 0.0
    if not rest:
        raise HTTPError(400, f"time: invalid duration {quoted}")
    total, pos = 0.0, 0
    while pos < len(rest):
        match = _DURATION_PART.match(rest, pos)
        if match is None:
            raise HTTPError(400, f"time: invalid duration {quoted}")
        number, unit = match.groups()
        if not unit:
            raise HTTPError(400, f"time: missing unit in duration {quoted}")
        if unit not in _UNIT_SECONDS:
            raise HTTPError(400, f"time: unknown unit {json.dumps(unit)} in duration {quoted}")
        total += float(number) * _UNIT_SECONDS[unit]
        pos = match.end()
    return -total if negative else total


def parse_keep_alive(value: object) -> float | None:
    """keep_alive in seconds (FOREVER when negative), or None when the request has none."""
    if value is None:
        return None
    if isinstance(value, str):
        seconds = parse_go_duration(value)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(int(value))  # Go truncates a JSON number to whole seconds
    else:
        go_type = {"bool": "bool", "array": "[]interface {}", "object": "map[string]interface {}"}
        raise HTTPError(400, f"Unsupported type: '{go_type[go_kind(value)]}'")
    return FOREVER if seconds < 0 else seconds


_INT_OPTIONS = frozenset(
    [
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "num_keep",
        "seed",
        "num_predict",
        "top_k",
        "repeat_last_n",
    ]
)
_FLOAT_OPTIONS = frozenset(
    [
        "temperature",
        "top_p",
        "min_p",
        "typical_p",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
    ]
)
_BOOL_OPTIONS = frozenset(["use_mmap", "numa"])


def parse_options(value: object, go_struct: str) -> dict[str, Any]:
    """Check the known runner options like ``api.Options.FromMap``; unknown ones are ignored.

    Ollama reports a wrongly typed option as a scheduling error, hence status 500.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HTTPError(
            400,
            f"json: cannot unmarshal {go_kind(value)} into Go struct field {go_struct}.options "
            "of type map[string]interface {}",
        )
    for key, val in value.items():
        if val is None:
            continue
        is_number = isinstance(val, int | float) and not isinstance(val, bool)
        if key in _INT_OPTIONS and not is_number:
            raise HTTPError(500, f'option "{key}" must be of type integer')
        if key in _FLOAT_OPTIONS and not is_number:
            raise HTTPError(500, f'option "{key}" must be of type float32')
        if key in _BOOL_OPTIONS and not isinstance(val, bool):
            raise HTTPError(500, f'option "{key}" must be of type boolean')
        if key == "stop" and not (isinstance(val, list) and all(isinstance(s, str) for s in val)):
            raise HTTPError(500, 'option "stop" must be of an array of strings')
    return value


class Clock:
    """Formats ``created_at`` cheaply: the date part is recomputed once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def utc_now(self) -> str:
        """RFC 3339 with trimmed nanoseconds in UTC, as Go's ``time.Time`` marshals it."""
        ns = time.time_ns()
        second, frac = divmod(ns, 1_000_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        fraction = f".{frac:09d}".rstrip("0").rstrip(".")
        return f"{self._prefix}{fraction}Z"


def local_time(epoch_seconds: float) -> str:
    """RFC 3339 in local time with offset, like ``modified_at`` and ``expires_at``."""
    return datetime.fromtimestamp(epoch_seconds).astimezone().isoformat()


def expiry_time(now: float, keep_alive: float) -> str:
    """``expires_at`` for a model idle since ``now``; FOREVER shows Go's year-2318 date."""
    seconds = _GO_MAX_DURATION_S if keep_alive == FOREVER else keep_alive
    return (datetime.fromtimestamp(now).astimezone() + timedelta(seconds=seconds)).isoformat()
