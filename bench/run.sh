#!/usr/bin/env bash
# The GPU benchmark, one command: build the workload, run each system in its own process, print
# the table. Logs and per-system JSON go to OUT as they are written, so a run cut short still
# shows how far it got.
#   bash bench/run.sh [OUT] [SIZE]            SIZE: 1b (default) or 8b
#   SYSTEMS="llm_assets" bash bench/run.sh    run a subset (results already in OUT are kept); also
#                                             llm_assets_2gpu (two engines, one per GPU: a 2-GPU machine),
#                                             raw_sglang and llm_assets_sglang (SGLang installed)
#   PARTITIONS=10 ROWS=1000 MAX_TOKENS=128    the workload's shape (the scale workload: 100, 500, 32)
#   COLD=1                                    start every system with empty kernel caches
#   ENGINE_ENV="KEY=VALUE,..."                environment of llm_assets' engine actors
#   PROFILE=1                                 once the GPU is busy: CPU by process and thread, py-spy stacks (OUT/SYSTEM.profile/;
#                                             py-spy on PATH: pip install its wheel with --upgrade into an existing --target;
#                                             it samples without pausing, yet compare timings only of runs profiled alike)
#   PROFILE_AT_S=N                            profile N s after the system starts instead
#   WARM_CACHE=DIR                            one compile cache for every system, kept: warm starts
#   CONFIG='{"max_concurrent_batches": 8}'    fields added to llm_assets' vLLM processor config
#   TP=2, PP=2                                every vLLM engine spans TP x PP GPUs (tensor / pipeline parallel; use its own OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/llm_assets_bench}
size=${2:-1b}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# Every system compiles from scratch: a compile cache left by the one before would flatter the next.
[ -n "${WARM_CACHE:-}" ] || export VLLM_DISABLE_COMPILE_CACHE=1
[ -f "$out/workload.json" ] || python3 bench/workload.py --out "$out" --size "$size" \
  --partitions "${PARTITIONS:-10}" --rows "${ROWS:-1000}" --max-tokens "${MAX_TOKENS:-128}" | tee "$out/workload.log"
# TP on the test machines: vLLM's all-reduce paths that need NVLink multicast off (see run_one.py).
if [ $(( ${TP:-1} * ${PP:-1} )) -gt 1 ]; then export VLLM_ALLREDUCE_USE_SYMM_MEM=0 VLLM_ALLREDUCE_USE_FLASHINFER=0; fi
for system in ${SYSTEMS:-raw_vllm ray_data_llm llm_assets}; do
  echo "== $system"
  # Fresh compile caches per system (vLLM's, inductor's, Triton's, FlashInfer's): a cache warmed
  # by the system before would shorten the next one's engine start.
  cache=${WARM_CACHE:-$(mktemp -d)}
  # The layout of llm_assets' compile cache (engines/compile_cache.py), so that every system keeps
  # (or starts without) the same caches.
  export LLM_ASSETS_COMPILE_CACHE=$cache VLLM_CACHE_ROOT=$cache/vllm TORCHINDUCTOR_CACHE_DIR=$cache/inductor \
    TRITON_CACHE_DIR=$cache/triton FLASHINFER_WORKSPACE_BASE=$cache/flashinfer
  # COLD=1 also wipes the per-user caches (torch's, Triton's, and those of a run without the
  # variables above): every system then starts as on a fresh machine. Off by default: it
  # deletes folders under ~/.cache.
  # It also drops the page cache (root only), so no system reads its imports from memory that the
  # one before warmed.
  if [ "${COLD:-0}" = 1 ]; then
    rm -rf ~/.cache/vllm ~/.cache/flashinfer ~/.cache/torch ~/.triton ~/.cache/llm_assets
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || echo "(could not drop the page cache)"
  fi
  touch "$out/.$system.start"
  python3 bench/run_one.py "$system" --workload "$out/workload.json" --out "$out/$system.json" > "$out/$system.log" 2>&1 \
    || { echo "$system failed; see $out/$system.log"; tail -20 "$out/$system.log"; }
  tail -1 "$out/$system.log"
  # What the start compiled just in time (FlashInfer's kernels, by module): a cold start's longest
  # quiet stretch on an H100, so each sitting records which modules it was.
  find "$cache/flashinfer" -name '*.so' -newer "$out/.$system.start" 2>/dev/null | sed "s|$cache/||" > "$out/$system.jit.txt" || true
done
python3 bench/table.py "$out"/*.json | tee "$out/table.md"
