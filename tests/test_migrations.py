"""The schema's upgrade when several processes start at once on a fresh database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

UPGRADE = "import sys; from app.migrations import upgrade; upgrade(sys.argv[1])"


def test_processes_upgrading_a_fresh_sqlite_database_at_once_all_succeed(tmp_path: Path) -> None:
    # Instance workers and the gateway each upgrade the schema as they start; started
    # together on a fresh file, one used to find a table the other had just created.
    for attempt in range(4):
        url = f"sqlite:///{tmp_path}/corral-{attempt}.db"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", UPGRADE, url], stderr=subprocess.PIPE, text=True
            )
            for _ in range(6)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
