#!/usr/bin/env bash
# Set up everything and run the test suite (the same command CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/real-backend.sh   # a real model server for tests/real_backend
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports   # the architecture's contracts in pyproject.toml: layers, no import cycles
.venv/bin/mypy           # the configuration in pyproject.toml: app, tasks and routing
exec .venv/bin/python -m pytest "$@"
