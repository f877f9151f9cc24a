#!/usr/bin/env bash
# Set up everything and run the whole stack with its demo; Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/corral up "$@"
