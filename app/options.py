"""Ollama's model options: the names it reads, and those it still takes from old clients.

Kept apart from ``app.schemas`` (which re-exports it) so that the settings' batch schedules
(``app.schedules``) can check options without importing the request model and its settings.
"""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic_core import PydanticCustomError

Number = StrictInt | StrictFloat


#: Options Ollama no longer reads but still takes from older clients: it logs each one as an
#: invalid option and ignores it (``api.Options.FromMap``). LangChain, among others, still
#: sends some of them, so Corral accepts them everywhere and drops them before Ollama.
OBSOLETE_OPTIONS = frozenset(
    {
        "tfs_z",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "penalize_newline",
        "low_vram",
        "f16_kv",
        "vocab_only",
        "use_mlock",
        "numa",
        "logits_all",
        "num_gqa",
        "rope_frequency_base",
        "rope_frequency_scale",
        "embedding_only",
    }
)


class Options(BaseModel):
    """Ollama's model options (``api.Options`` and its ``Runner``), typed: a mistyped option
    fails at the call. An obsolete option (:data:`OBSOLETE_OPTIONS`) is dropped, as Ollama
    ignores it; any other unknown name is refused here, where it is most likely a typo (the
    gateway's Ollama API ignores it instead, as Ollama does: see :func:`split_options`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Predict options, read per request.
    num_keep: StrictInt | None = None
    seed: StrictInt | None = None
    num_predict: StrictInt | None = None
    top_k: StrictInt | None = None
    top_p: Number | None = None
    min_p: Number | None = None
    typical_p: Number | None = None
    repeat_last_n: StrictInt | None = None
    temperature: Number | None = None
    repeat_penalty: Number | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    stop: list[StrictStr] | None = None
    # Runner options: a change reloads the model on that server.
    num_ctx: StrictInt | None = None
    num_batch: StrictInt | None = None
    num_gpu: StrictInt | None = None
    main_gpu: StrictInt | None = None
    use_mmap: StrictBool | None = None
    num_thread: StrictInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data  # pydantic says what is wrong with it
        known, ignored = split_options(data)
        unknown = sorted(name for name in ignored if name not in OBSOLETE_OPTIONS)
        if unknown:
            raise PydanticCustomError(
                "unknown_option",
                "unknown option {names}: not one of Ollama's options ({known}). Ollama and the"
                " gateway's Ollama API ignore an unknown option; infer() refuses it as most"
                " likely a misspelling: correct it or leave it out",
                {"names": ", ".join(map(repr, unknown)), "known": ", ".join(cls.model_fields)},
            )
        return known


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options Ollama reads, and those it would ignore (obsolete or unknown)."""
    known = {k: v for k, v in options.items() if k in Options.model_fields}
    return known, {k: v for k, v in options.items() if k not in Options.model_fields}
