#!/usr/bin/env bash
# Set up, then test: by default the fast tier (lint, format, and every test not marked slow: real
# vLLM CPU engines where a test checks what an engine computes, the fake engine for orchestration),
# within ten minutes on a 2-core machine. `--all`: every tier (what CI runs). Other arguments go
# to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
tier=(-m "not slow")
args=()
for arg in "$@"; do
  if [ "$arg" = "--all" ]; then tier=(); else args+=("$arg"); fi
done
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check .
ruff format --check .
set +e
python -m pytest -q -p no:cacheprovider "${tier[@]}" ${args[@]+"${args[@]}"}
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$status"
