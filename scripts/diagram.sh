#!/usr/bin/env bash
# Render docs/architecture.dot (Graphviz) into docs/architecture.png, shown in the README.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v dot >/dev/null || { echo "error: Graphviz is not installed (apt-get install graphviz)" >&2; exit 1; }
dot -Tpng -Gdpi=110 docs/architecture.dot -o docs/architecture.png
echo "docs/architecture.png"
