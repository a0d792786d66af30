#!/usr/bin/env bash
# Set up, then run the demo pipeline (SmolLM2-135M-Instruct on the bundled prompts) as one
# Dagster run over every stage, and print an excerpt of its output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

export DAGSTER_HOME=${DAGSTER_HOME:-$PWD/.dagster_home}
mkdir -p "$DAGSTER_HOME"
# The instance settings (run monitoring, one run at a time; README "Instance settings") for a
# DAGSTER_HOME without any.
if [ ! -s "$DAGSTER_HOME/dagster.yaml" ]; then
  if [ -f .dagster_home/dagster.yaml ]; then
    cp .dagster_home/dagster.yaml "$DAGSTER_HOME/dagster.yaml"
  else
    echo "note: .dagster_home/dagster.yaml is missing (git checkout -- .dagster_home/dagster.yaml restores it); using Dagster's default instance settings" >&2
  fi
fi
touch "$DAGSTER_HOME/dagster.yaml"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

python -m llm_assets.cli add-partitions -f definitions.py --pipeline demo
# The run's progress lines, not Dagster's DEBUG events or vLLM's own log (both stay in their logs).
# `dagster job execute -f definitions.py -j demo_job --tags '{"dagster/partition": "prompts.jsonl"}'`
# runs the same (Dagster 1.13 prints a deprecation for it).
LLM_ASSETS_RAY_LOG_TO_DRIVER=0 dg launch --job demo_job --partition prompts.jsonl \
  --config-json '{"loggers": {"console": {"config": {"log_level": "INFO"}}}}'
python - <<'PY'
import json, os, pyarrow.parquet as pq
root = os.environ.get("LLM_ASSETS_STORAGE", ".llm_assets/storage")
folder = f"{root}/demo/postprocess/prompts.jsonl"
manifest = json.load(open(f"{folder}/_manifest.json"))
rows = pq.read_table([f"{folder}/{name}" for name in manifest["files"]]).to_pylist()
print(f"\n{manifest['rows']} rows in {folder}:")
for row in sorted(rows, key=lambda r: int(r["row_id"].split(":")[1]))[:6]:
    answer = " ".join(row["answer"].split())
    print(f"  {row['question']}\n    -> {answer[:120]}")
PY
