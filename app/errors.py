"""Typed errors: each says what happened and what to do.

Errors raised by a job travel through the Redis result backend as (module, class, args) and
are rebuilt in the caller's process, so their constructors take only JSON-able positional
arguments.
"""

from __future__ import annotations

from typing import Any


class CorralError(Exception):
    """Base of every error Corral raises."""

    #: The request refused, by its index in the list given to ``infer.submit_many`` (which
    #: queues none of them); None for a single call. Its message then starts with it.
    item: int | None = None

    def __str__(self) -> str:
        return self._naming_item(super().__str__())

    def _naming_item(self, text: str) -> str:
        return text if self.item is None else f"item {self.item}: {text}"


# Raised at the call, before anything is queued.


class InvalidRequest(CorralError, ValueError):
    """The request does not validate; nothing was queued."""


class ModelNotServed(InvalidRequest):
    """No instance in the fleet serves this model; nothing was queued."""


class RateLimited(CorralError):
    """The agent's class refuses jobs over its rate limit; nothing was queued.

    ``retry_after`` is the number of seconds until a job would be accepted.
    """

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after)
        self.message, self.retry_after = message, retry_after

    def __str__(self) -> str:
        return self._naming_item(self.message)


class Overloaded(CorralError):
    """The fleet is at its highest degradation level and refuses new normal and batch jobs;
    nothing was queued. ``retry_after`` is a hint in seconds; interactive jobs still go."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after)
        self.message, self.retry_after = message, retry_after

    def __str__(self) -> str:
        return self._naming_item(self.message)


class BrokerUnavailable(CorralError):
    """The broker did not take the job: unreachable, or no confirm within ``publish_timeout``
    seconds, after kombu's retries on fresh connections. Retry the call; if it keeps failing,
    check ``broker_url`` and the broker. A job whose confirm was lost may still run, under its
    own id, with nobody waiting for it.

    ``queued``: the ids of the jobs the broker did confirm before it failed: none, except in
    an ``infer.submit_many`` call of more than one chunk (500 jobs), whose first chunks stand.
    """

    queued: tuple[str, ...] = ()
    #: How many of the call's jobs were confirmed (set by ``app.jobs.publish``).
    published: int = 0


# Raised by one call to an Ollama instance (inside a worker).


class OllamaError(CorralError):
    """One attempt on one instance failed."""

    transient = True

    def __init__(self, message: str, instance: str = "", status: int | None = None) -> None:
        super().__init__(message, instance, status)
        self.message, self.instance, self.status = message, instance, status

    def __str__(self) -> str:
        where = f" on {self.instance}" if self.instance else ""
        code = f" (HTTP {self.status})" if self.status else ""
        return f"{self.message}{where}{code}"


class InstanceUnavailable(OllamaError):
    """Connection refused or reset: the server is down or restarting."""


class InstanceTimeout(OllamaError):
    """The server accepted the request but said nothing for ``request_timeout`` seconds."""


class InstanceSilent(InstanceTimeout):
    """The server said nothing for far longer than it takes this model there (learned from its
    earlier answers, see ``app.jobs.silence``): a hung server, cut long before ``request_timeout``.
    """


class JobCancelled(CorralError):
    """The job was revoked while its call to Ollama ran; the call was closed (not a failure)."""


class InstanceBusy(OllamaError):
    """HTTP 503: the server's own queue is full."""


class InstanceFailed(OllamaError):
    """HTTP 5xx, an error line in the stream, or a broken or malformed answer."""


class RequestRejected(OllamaError):
    """HTTP 4xx: retrying elsewhere will not help (bad request, unknown model)."""

    transient = False


# Raised by ``.get()`` when a job gave up.


class JobFailed(CorralError):
    """The job ended without a result. ``history`` lists every attempt's error."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details or {})
        self.message = message
        self.details = details or {}

    @property
    def history(self) -> list[dict[str, Any]]:
        history: list[dict[str, Any]] = self.details.get("history", [])
        return history

    @property
    def job_id(self) -> str | None:
        return self.details.get("job_id")

    def __str__(self) -> str:
        return self.message


class RetriesExhausted(JobFailed):
    """Every attempt failed with a transient error; the job is in the dead-letter queue."""


class JobRejected(JobFailed):
    """Ollama refused the request (4xx) or the model is no longer served; not retried."""
