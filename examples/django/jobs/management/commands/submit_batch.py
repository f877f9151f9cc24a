"""``manage.py submit_batch``: prompts as batch-tier ``infer`` jobs; prints one job id a line.

manage.py submit_batch --model llama3.2:3b "first prompt" "second prompt"
manage.py submit_batch --model llama3.2:3b --file prompts.txt --wait
"""

import time
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from celery.exceptions import TimeoutError as ResultTimeout
from django.core.management.base import BaseCommand, CommandError

from app.errors import InvalidRequest
from tasks import infer
from tasks.infer import InferAsyncResult


class Command(BaseCommand):
    help = "Submit prompts as batch-tier infer jobs and print their ids, one a line."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("prompts", nargs="*", help="prompts (more with --file)")
        parser.add_argument("--file", type=Path, help="a file of prompts, one a line")
        parser.add_argument("--model", required=True, help="e.g. llama3.2:3b")
        parser.add_argument(
            "--wait", action="store_true", help="then wait for every job and print its answer"
        )
        parser.add_argument(
            "--timeout", type=float, default=600.0, help="with --wait: seconds for the batch"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        prompts = list(options["prompts"])
        if options["file"] is not None:
            lines = options["file"].read_text().splitlines()
            prompts += [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise CommandError("no prompts: give them as arguments or with --file")
        jobs = []
        for prompt in prompts:
            try:
                job = infer.delay(model=options["model"], prompt=prompt, tier="batch")
            except InvalidRequest as exc:
                # Every job has the same model and tier, so a bad one is the first: nothing
                # was queued.
                raise CommandError(str(exc)) from None
            jobs.append(job)
            self.stdout.write(job.id)
        if options["wait"]:
            failed = self._wait(jobs, options["timeout"])
            if failed:
                raise CommandError(f"{failed} of {len(jobs)} jobs did not succeed")

    def _wait(self, jobs: list[InferAsyncResult], timeout: float) -> int:
        """Print each job's instance and answer as it comes; returns how many failed."""
        deadline = time.monotonic() + timeout
        failed = 0
        for job in jobs:
            try:
                result = job.get(timeout=max(deadline - time.monotonic(), 0.1))
            except ResultTimeout:
                self.stderr.write(f"{job.id} not finished after {timeout:.0f}s")
                failed += 1
            except Exception as exc:  # the job's typed error: RetriesExhausted, JobRejected...
                self.stderr.write(f"{job.id} failed: {type(exc).__name__}: {exc}")
                failed += 1
            else:
                self.stdout.write(f"{job.id} {result.routing.instance}: {result.text}")
        return failed
