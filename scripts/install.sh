#!/usr/bin/env bash
# Install what the project needs into the current Python: torch first where none is present
# (TORCH_VERSION, default 2.13.0), then the requirements and the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install "torch==${TORCH_VERSION:-2.13.0}"
fi
"$PYTHON" -m pip install -r requirements-test.txt
