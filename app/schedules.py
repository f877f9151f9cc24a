"""Recurring batch jobs: the ``schedules`` setting.

Each schedule names a batch job, when it runs (``every`` N seconds or a ``cron`` line) and its
arguments. ``corral beat`` turns them into Celery's ``beat_schedule`` (``app.celery_app``);
the jobs themselves are ``tasks.batch``.

This module imports nothing from ``app`` at load time: ``app.settings`` imports it.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from string import Formatter
from typing import Annotated, Any, Literal

from celery.schedules import ParseException, crontab
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from app.options import Options

#: What the ``cron`` field holds, in crontab's order (times are UTC, Celery's default).
CRON_FIELDS = "minute hour day-of-month month day-of-week"


def _absolute(path: Path) -> Path:
    # The router that runs the job may have another working directory than beat.
    return path.expanduser().resolve()


AbsolutePath = Annotated[Path, AfterValidator(_absolute)]


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    every: float | None = Field(None, gt=0, description="seconds between runs")
    cron: str | None = Field(None, description=f"'{CRON_FIELDS}', UTC")
    model: str = Field(min_length=1, max_length=200)
    output: AbsolutePath = Field(description="JSONL file that gets one line per input")

    @field_validator("cron")
    @classmethod
    def _parse_cron(cls, cron: str | None) -> str | None:
        if cron is not None:
            try:
                crontab.from_string(cron)
            except (ValueError, ParseException) as exc:
                raise ValueError(f"bad cron {cron!r} ({exc}); expected '{CRON_FIELDS}'") from None
        return cron

    @model_validator(mode="after")
    def _one_timing(self) -> _Schedule:
        if (self.every is None) == (self.cron is None):
            raise ValueError("give either 'every' (seconds) or 'cron', not both or neither")
        return self

    def when(self) -> timedelta | crontab:
        """The schedule in Celery's terms."""
        if self.cron is not None:
            return crontab.from_string(self.cron)
        assert self.every is not None
        return timedelta(seconds=self.every)


class EmbedFolder(_Schedule):
    """Embed every new or changed document of a folder, one embedding per file."""

    job: Literal["embed_folder"]
    folder: AbsolutePath
    pattern: str = Field("*", min_length=1, description="glob under folder; '**/*.md' recurses")


class PromptFile(_Schedule):
    """Run a prompt template over each input of a file.

    A ``.jsonl`` file holds one JSON object a line: its fields fill the template and its
    ``id`` (default: the line number) names the input. Any other file holds one input a line,
    named by its line number and filling ``{input}``.
    """

    job: Literal["prompt_file"]
    inputs: AbsolutePath
    prompt: str = Field("{input}", min_length=1, description="str.format template")
    system: str | None = None
    kind: Literal["generate", "chat"] = "generate"
    options: dict[str, Any] | None = None

    @property
    def records(self) -> bool:
        return self.inputs.suffix == ".jsonl"

    @field_validator("options")
    @classmethod
    def _known_options(cls, options: dict[str, Any] | None) -> dict[str, Any] | None:
        if options is not None:
            Options.model_validate(options)
        return options

    @model_validator(mode="after")
    def _template_fields(self) -> PromptFile:
        try:
            names = {f for _, f, _, _ in Formatter().parse(self.prompt) if f is not None}
        except ValueError as exc:
            raise ValueError(f"bad prompt template: {exc}") from None
        bad = sorted(n for n in names if not re.fullmatch(r"[A-Za-z_]\w*", n))
        if bad:
            raise ValueError(f"prompt template fields must be plain names, not {bad}")
        if not self.records and names - {"input"}:
            raise ValueError(
                f"prompt template of a text inputs file may only use {{input}}, not "
                f"{sorted(names - {'input'})} (use a .jsonl file for named fields)"
            )
        return self


Schedule = Annotated[EmbedFolder | PromptFile, Field(discriminator="job")]


def _unique_names(schedules: list[EmbedFolder | PromptFile]) -> list[EmbedFolder | PromptFile]:
    names = [s.name for s in schedules]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"schedule names must be unique: {', '.join(twice)} repeated")
    return schedules


Schedules = Annotated[list[Schedule], AfterValidator(_unique_names)]
