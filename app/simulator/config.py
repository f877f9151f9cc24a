"""Configuration of simulated Ollama servers.

The fault knobs live in their own base model so that ``POST /sim/faults`` can validate a
partial update with exactly the same constraints as the configuration file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator


def normalize_name(name: str) -> str:
    """Give a model name its tag the way Ollama does: ``llama3.2`` means ``llama3.2:latest``.

    Only the last path segment can carry a tag, so a registry host with a port
    (``host:5000/ns/model``) still gets ``:latest``.
    """
    if ":" in name.rsplit("/", 1)[-1]:
        return name
    return f"{name}:latest"


class SimModel(BaseModel):
    """One model in an instance's catalogue, with the timing a real server would show."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    kind: Literal["chat", "embed"] = "chat"
    size_bytes: int = Field(2_000_000_000, ge=0)
    load_seconds: float = Field(0.5, ge=0)
    # 0 or inf means instant; anything else is the single-request decode rate.
    tokens_per_second: float = Field(50.0, ge=0)
    prompt_tokens_per_second: float = Field(2000.0, ge=0)
    default_num_predict: int = Field(24, ge=0)
    embedding_length: int = Field(768, ge=1)
    # An /api/embed call costs, as on a GPU, a fixed part per call (reading the weights,
    # launching the pass: most of a short input's time) plus a part per input in it.
    embed_call_seconds: float = Field(0.002, ge=0)
    #: Each input of a call; None: its tokens at ``prompt_tokens_per_second``.
    embed_input_seconds: float | None = Field(None, ge=0)
    family: str = "llama"
    parameter_size: str = "3.2B"
    quantization_level: str = "Q4_K_M"

    @field_validator("name")
    @classmethod
    def _tagged(cls, name: str) -> str:
        return normalize_name(name)


class FaultKnobs(BaseModel):
    """Settings that ``POST /sim/faults`` may change while the server runs."""

    model_config = ConfigDict(extra="forbid")

    error_rate: float = Field(0.0, ge=0, le=1)
    busy_rate: float = Field(0.0, ge=0, le=1)
    hang: bool = False
    mid_stream_error_rate: float = Field(0.0, ge=0, le=1)
    cut_stream_rate: float = Field(0.0, ge=0, le=1)
    slow_factor: float = Field(1.0, gt=0)
    speed: float = Field(1.0, gt=0)
    seed: int | None = None


class SimInstance(FaultKnobs):
    """One simulated Ollama server.

    ``models`` is also accepted as ``model`` so that a TOML fleet file can use
    ``[[instance.model]]`` tables.  ``preloaded`` models are loaded at start without load
    time and kept loaded until evicted, as if preloaded with ``keep_alive: -1``.
    ``memory_bytes`` (optional) adds Ollama's memory fit to the model count: the loaded
    models' ``size_bytes`` never sum to more than it.
    Port 0 picks a free port when served; the fleet writes the real port back.
    """

    name: str = Field(min_length=1)
    port: int = Field(ge=0, le=65535)
    host: str = "127.0.0.1"
    num_parallel: int = Field(2, ge=1)
    max_loaded_models: int = Field(3, ge=1)
    memory_bytes: int | None = Field(
        None,
        ge=1,
        description=(
            "Memory (VRAM) for loaded models, as Ollama's fit check: a model loads only if "
            "its size_bytes fits beside the loaded ones, else idle models are evicted (busy "
            "ones waited for) until it does; a model larger than this fails with a 500. "
            "None: no memory limit, only max_loaded_models counts."
        ),
    )
    max_queue: int = Field(512, ge=0)
    keep_alive_seconds: float = 300.0
    parallel_slowdown: float = Field(0.2, ge=0)
    models: list[SimModel] = Field(
        default_factory=list, validation_alias=AliasChoices("models", "model")
    )
    preloaded: list[str] = Field(default_factory=list)

    @field_validator("preloaded")
    @classmethod
    def _tag_preloaded(cls, names: list[str]) -> list[str]:
        return [normalize_name(n) for n in names]

    @model_validator(mode="after")
    def _consistent(self) -> SimInstance:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"instance {self.name!r} lists a model twice: {names}")
        unknown = set(self.preloaded) - set(names)
        if unknown:
            raise ValueError(f"instance {self.name!r} preloads unknown models {sorted(unknown)}")
        if len(self.preloaded) > self.max_loaded_models:
            raise ValueError(f"instance {self.name!r} preloads more than max_loaded_models")
        sizes = {m.name: m.size_bytes for m in self.models}
        if self.memory_bytes is not None and (
            sum(sizes[n] for n in self.preloaded) > self.memory_bytes
        ):
            raise ValueError(f"instance {self.name!r} preloads more than memory_bytes holds")
        return self

    def faults(self) -> dict[str, object]:
        """Current values of the live-tunable knobs."""
        return {name: getattr(self, name) for name in FaultKnobs.model_fields}
