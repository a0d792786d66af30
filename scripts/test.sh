#!/usr/bin/env bash
# Set up, then run the test suite (real vLLM CPU engine, real Ray, real Dagster runs).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
# Two pytest workers, each with its own Ray, each taking whole test files: much of a test's time
# is spent waiting (engine and node starts, Dagster daemons, sensors' ticks), not computing.
# PYTEST_WORKERS=0 runs in one process.
python -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$status"
