"""Corral's one settings object.

Read, highest precedence first, from: keyword arguments, environment variables
(``CORRAL_*``, nested with ``__``), a TOML file (``CORRAL_CONFIG``, default ``./corral.toml``),
then the defaults below. Every process (client, router, instance worker, gateway) reads the
same object, so queue names, priorities and Redis keys agree everywhere.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from app.schedules import Schedules
from routing.capacity import GIB

Tier = Literal["interactive", "normal", "batch"]
TIERS: tuple[Tier, ...] = ("interactive", "normal", "batch")
Strategy = Literal[
    "least_connections", "round_robin", "weighted", "response_time", "random", "smart"
]


def normalize_model(name: str) -> str:
    """Ollama's own rule: a model name without a tag means ``:latest``."""
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


Role = Literal["chat", "embedding", "both"]


class InstanceConfig(BaseModel):
    """One Ollama server in the fleet: a row of the registry (``app.fleet.registry``), which the
    ``instances`` of the settings seed."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    url: str = Field(description="Base URL, e.g. http://gpu-1:11434", max_length=512)
    parallelism: int = Field(2, ge=1, le=64, description="OLLAMA_NUM_PARALLEL of that server")
    max_loaded_models: int = Field(
        3, ge=1, le=64, description="OLLAMA_MAX_LOADED_MODELS of that server (default 3 per GPU)"
    )
    memory_gb: float | None = Field(
        None,
        gt=0,
        description="GiB the server gives models (VRAM; RAM on a CPU box): the loaded models'"
        " sizes fit in it; None = max_loaded_models alone",
    )
    weight: float = Field(1.0, gt=0)
    models: list[str] | None = Field(None, description="Served models; None = discover /api/tags")
    role: Role = Field("both", description="jobs it is meant for: chat, embedding or both")
    priority: int = Field(5, ge=0, le=9, description="priority level among instances, 9 first")
    request_timeout: float | None = Field(
        None, gt=0, description="longest silence from this server; None = request_timeout"
    )
    retry_attempts: int | None = Field(None, ge=1, description="None = the max_attempts setting")
    rate_limit_per_minute: int | None = Field(None, ge=1, description="None = no limit")
    enabled: bool = Field(True, description="False = draining: no new jobs, running ones finish")
    tags: list[str] = Field(default_factory=list)

    @property
    def memory_bytes(self) -> float | None:
        return None if self.memory_gb is None else self.memory_gb * GIB

    @field_validator("url")
    @classmethod
    def _strip_slash(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, not {url!r}")
        return url.rstrip("/")

    @field_validator("models")
    @classmethod
    def _normalize(cls, models: list[str] | None) -> list[str] | None:
        return None if models is None else [normalize_model(m) for m in models]


def _config_file() -> Path:
    return Path(os.environ.get("CORRAL_CONFIG", "corral.toml"))


#: An agent class's name: as an instance's, it appears in Redis keys and metric labels.
CLASS_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def check_class_name(name: str) -> str:
    if not re.fullmatch(CLASS_NAME, name) or len(name) > 64:
        raise ValueError(
            f"agent class name {name!r} is not valid: up to 64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return name


class AgentClass(BaseModel):
    """Limits shared by a class of agents (README "Rate limits"); unset means no limit.

    The settings only seed them: the policy in force is the registry's (``app.policy.live``).
    """

    model_config = ConfigDict(extra="forbid")

    agents: list[str] = Field(
        default_factory=list, description="agent names of this class; shell patterns (opus-*)"
    )
    rate_per_minute: float | None = Field(None, gt=0, description="jobs a minute, whole class")
    agent_rate_per_minute: float | None = Field(
        None, gt=0, description="jobs a minute, each agent of the class"
    )
    on_limit: Literal["wait", "refuse"] = Field(
        "wait", description="wait: the job starts when the limit allows; refuse: error at once"
    )
    max_in_flight: int | None = Field(
        None, ge=1, description="bulkhead: slots the class may hold at once, fleet-wide"
    )


def _tier_delays() -> dict[Tier, float]:
    return {"interactive": 0.0, "normal": 60.0, "batch": 600.0}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CORRAL_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    # Where things live.
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    result_backend: str = "redis://127.0.0.1:6379/0"
    redis_url: str = Field("redis://127.0.0.1:6379/1", description="fleet state and cache")
    redis_sentinel_master: str = Field(
        "corral",
        description="the Sentinel service name, for a redis_url or result_backend written as"
        " sentinel://host:26379/db;sentinel://host2:26379;... (app.state.client)",
    )
    namespace: str = Field(
        "corral",
        pattern=r"^[a-z0-9][a-z0-9_-]*$",
        description="prefix of every queue name and Redis key; lets stacks share a broker",
    )
    queue_type: Literal["classic", "quorum"] = Field(
        "classic",
        description="classic: priority queues (strict priority 0-9), each on one RabbitMQ node;"
        " quorum: replicated across the cluster, FIFO (RabbitMQ before 4.3 keeps no message"
        " priority in them; app.queues)",
    )
    broker_consumer_timeout: float = Field(
        1800.0,
        gt=0,
        description="RabbitMQ's consumer_timeout in seconds (rabbitmq.conf; 30 min by default):"
        " a router gives back a job it held half that long waiting for a slot",
    )

    # The fleet.
    instances: list[InstanceConfig] = Field(default_factory=list)
    strategy: Strategy = "least_connections"
    placement: bool = Field(
        True,
        description="route by the placement plan: which models each instance should hold"
        " (routing.placement), so that boxes holding few models do not swap them job by job",
    )
    placement_swaps: bool = Field(
        True,
        description="with placement: each instance worker unloads (keep_alive 0) the models the"
        " plan moves off its server and preloads the ones it moves on (app.jobs.model_swap),"
        " instead of leaving the choice of what to evict to Ollama",
    )

    # Jobs.
    max_attempts: int = Field(3, ge=1, description="tries on distinct instances before dead-letter")
    retry_backoff: float = Field(0.5, ge=0, description="first retry waits up to this, doubling")
    retry_backoff_max: float = Field(10.0, ge=0)
    connect_timeout: float = Field(3.0, gt=0)
    request_timeout: float = Field(300.0, gt=0, description="longest silence from Ollama, seconds")
    result_expires: int = Field(6 * 3600, ge=60)
    publish_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds a submit waits for the broker to confirm a job before it tries"
        " again on a new connection (then BrokerUnavailable: the gateway's 503)",
    )
    default_tier: Tier = "normal"
    down_cooldown: float = Field(
        5.0, ge=0, description="seconds an open circuit breaker stays open"
    )
    breaker_threshold: int = Field(3, ge=1, description="failures in a row that open the breaker")
    silence_floor_s: float = Field(
        5.0, gt=0, description="a stream may always be silent this long (learned bounds above it)"
    )
    silence_factor: float = Field(
        10.0, ge=1, description="a stream silent this many times its expected time has failed"
    )
    silence_load_factor: float = Field(
        3.0, ge=1, description="allowance for a cold load: this many times its learned time"
    )
    tier_delay_seconds: dict[Tier, float] = Field(
        default_factory=_tier_delays,
        description="head start of more urgent tiers; a job waiting longer is served as urgent",
    )
    priority_step_seconds: float = Field(1.0, ge=0, description="head start per priority step")

    # Batched embeddings (app.jobs.embed_batch): embed jobs of one model waiting for a slot
    # ride along in the call of one that got a slot, as one /api/embed call of many inputs.
    embed_batching: bool = Field(True, description="False: one /api/embed call per embed job")
    embed_batch_max: int = Field(
        64, ge=1, description="most inputs in one batched /api/embed call (1: no batching)"
    )
    embed_batch_linger_ms: float = Field(
        5.0,
        ge=0,
        description="a batch that is not full waits this long for more jobs of its model,"
        " only while more of them are queued",
    )

    # Response cache.
    cache_enabled: bool = True
    cache_ttl: int = Field(24 * 3600, ge=1)

    # Recurring batch jobs, run by `corral beat` (see app.schedules).
    schedules: Schedules = Field(default_factory=list)

    # Rate limits (app.policy.rate_limits): they seed the live policy (app.policy.live), which
    # `corral policy` and the admin API change; a file entry edited later wins again.
    agent_classes: dict[str, AgentClass] = Field(
        default_factory=dict, description="per agent class: who is in it, and its limits"
    )
    global_rate_per_minute: float | None = Field(
        None, gt=0, description="jobs a minute started across every agent"
    )

    # Degradation levels 1-3 (app.policy.degradation): the thresholds to enter each.
    degradation_backlog_per_slot: tuple[float, float, float] = Field(
        (10.0, 40.0, 500.0),
        description="interactive and normal jobs waiting per slot to enter levels 1, 2, 3",
    )
    degradation_interactive_wait_s: tuple[float, float, float] = Field(
        (30.0, 60.0, 120.0), description="moving average of interactive jobs' wait, seconds"
    )
    degradation_hold: float = Field(
        15.0, ge=0, description="seconds below a level before stepping down one"
    )

    # Processes.
    router_concurrency: int = Field(32, ge=1, description="router threads per tier")
    router_prefetch_per_model: int | None = Field(
        None,
        ge=1,
        description="jobs of one model's queue a router holds at once, each holding a thread "
        "while it waits for a slot (keep route queues x this <= router_concurrency); None: "
        "Celery's prefetch, the thread count, shared by the router's queues",
    )
    heartbeat_interval: float = Field(2.0, gt=0)
    grant_lease: float = Field(60.0, gt=0, description="a granted slot is reclaimed if unused")

    # Logs and traces
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per line; every line names its job id"
    )
    tracing: bool = Field(
        False, description="OpenTelemetry spans, exported over OTLP (OTEL_EXPORTER_OTLP_*)"
    )
    tracing_dir: Path | None = Field(
        None, description="with tracing: write spans as JSON lines here instead of OTLP"
    )

    # Metrics
    metrics_enabled: bool = Field(True, description="workers record job metrics in Redis")
    metrics_flush_seconds: float = Field(
        0.5, gt=0, description="seconds a process sums its job metrics before writing them"
    )
    metrics_host: str = Field("127.0.0.1", description="address `corral metrics` listens on")
    metrics_port: int = Field(9808, ge=1, le=65535, description="port of `corral metrics`")

    # Gateway
    database_url: str = Field(
        "sqlite:///.corral/corral.db",
        description="API keys (Alembic-managed); e.g. postgresql+psycopg://user@host/db",
    )
    gateway_auth: bool = Field(True, description="require an API key (Authorization: Bearer)")
    gateway_max_body_bytes: int = Field(32 * 2**20, ge=1024, description="larger bodies get 413")
    gateway_job_timeout: float = Field(
        3600.0, gt=0, description="longest a request waits for its job before a 504, seconds"
    )
    gateway_threads: int = Field(
        64, ge=4, description="gateway threads for publishing, revoking and database calls"
    )
    gateway_key_cache_ttl: float = Field(
        5.0, ge=0, description="seconds a key lookup is reused: a revoked key works this long"
    )
    gateway_redis_connections: int = Field(
        1000, ge=10, description="Redis connections per gateway; each stream holds one"
    )

    @field_validator("agent_classes")
    @classmethod
    def _class_names(cls, classes: dict[str, AgentClass]) -> dict[str, AgentClass]:
        for name in classes:
            check_class_name(name)
        return classes

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_config_file())
        return init_settings, env_settings, toml

    def instance(self, name: str) -> InstanceConfig:
        for inst in self.instances:
            if inst.name == name:
                return inst
        known = ", ".join(i.name for i in self.instances) or "none"
        raise KeyError(f"no instance named {name!r} in the fleet (configured: {known})")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
