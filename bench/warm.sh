#!/usr/bin/env bash
# Warm restarts: what the second run of a model costs. One small llm_assets job three times on one
# machine, each in a fresh process, all with one compile cache folder (vLLM's, inductor's, Triton's
# and FlashInfer's caches, what LLM_ASSETS_COMPILE_CACHE holds):
#   cold        empty caches (COLD=1): the first run of the model on a new node;
#   same_node   the compile cache the cold run left, the node's other caches as it left them;
#   fresh_node  the compile cache kept (a shared filesystem's folder), everything else a new node
#               lacks wiped again (FlashInfer's, torch's and Triton's per-user caches, the page cache).
#   bash bench/warm.sh [OUT] [SIZE]     PARTITIONS=1 ROWS=100 MAX_TOKENS=128 unless set
#   STARTS="cold fresh_node"            a subset, in order (the cold run fills the cache the others read)
# On the H100 test machine (1B config) the cold run takes about 4 minutes and the same-node run
# 1.5: give a call 8 minutes for all three. Copy back the .json and .log files as one tar: a
# device call returns a handful of files.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/llm_assets_warm}
mkdir -p "$out"
size=${2:-1b}
export PARTITIONS=${PARTITIONS:-1} ROWS=${ROWS:-100} MAX_TOKENS=${MAX_TOKENS:-128} SYSTEMS=llm_assets
export WARM_CACHE=$out/compile-cache
starts=${STARTS:-cold same_node fresh_node}
case " $starts " in *" cold "*) rm -rf "$WARM_CACHE" ;; esac
for start in $starts; do
  cold=1
  [ "$start" = same_node ] && cold=0
  COLD=$cold bash bench/run.sh "$out" "$size" > "$out/$start.table" 2>&1 || true
  mv "$out/llm_assets.json" "$out/$start.json"
  mv "$out/llm_assets.log" "$out/$start.log"
  mv "$out/llm_assets.jit.txt" "$out/$start.jit.txt" 2>/dev/null || true
done
python3 - "$out" <<'EOF' | tee "$out/warm.md"
import json, os, sys
out = sys.argv[1]
print("| start | engine ready after its actor's creation (s) | engine's own start (s) | whole run (s) | compile cache | rows |")
print("|---|---|---|---|---|---|")
for start in ("cold", "same_node", "fresh_node"):
    if not os.path.exists(f"{out}/{start}.json"):
        continue
    r = json.load(open(f"{out}/{start}.json"))
    engine = (r.get("engine_placement") or [{}])[0]  # one engine
    print(
        f"| {start} | {r['engine_start_s']:.1f} | {engine.get('start_seconds', '-')} | {r['run_s']:.1f} "
        f"| {engine.get('compile_cache', '-')} | {r['rows']} |"
    )
EOF
