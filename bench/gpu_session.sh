#!/usr/bin/env bash
# The GPU checks that are still open, for one command on a GPU test machine once the wheels from
# ../shared/gpu/bundle.sh are installed into /tmp/site (see docs/benchmarks.md). Each step has its
# own time limit, logs to OUT as it goes, and a failed step does not stop the next.
#   bash bench/gpu_session.sh OUT STEP...
# Steps:
#   tests    pytest tests/test_gpu.py (the demo, TP=2 and PP=2 where 2+ GPUs, the Serve app, video through a
#            tiny Qwen2-VL; GPU_TESTS_K=EXPR picks some. The demo, TP=2 and PP=2 alone took 6 min in sitting 17,
#            so give the video and Serve tests a call of their own with -k): 6 + ~4 min
#   embed    bench/embed.py against raw vLLM's LLM.embed, two sizes (or EMBED_SIZES), one GPU (GPU 0, or GPUS): ~5 min
#   2gpu     one engine against two on GPUs 0,1 (or GPUS), the scale-like shape (20 x 500 x 32): ~4 min
#   tp       raw vLLM TP=2 against llm_assets TP=2 (GPUs 0,1), the 8B config: ~5 min
#   tp4      raw vLLM TP=2 (GPUs 0,1) against llm_assets' two TP=2 replicas on GPUs 0-3, the 8B config (TP4_SYSTEMS
#            picks others, e.g. "llm_assets" for one replica, into the same /tmp/bench-tp4): ~5 min
#   pp       raw vLLM PP=2 against llm_assets PP=2 (GPUs 0,1, or GPUS), the 8B config: ~5 min
#   sglang   the SGLang GPU tests (a partition, a Serve app), with SGLang's bundle (BUNDLE_KEEP="transformers
#            tokenizers" ../shared/gpu/bundle.sh sglang==0.5.15) installed in /tmp/site-sglang: ~5 min
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1
shift
mkdir -p "$out"
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# The test machines keep NVLink multicast off; these stay set for every process started here.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for step in "$@"; do
  echo "== $step $(date -u +%T)"
  case $step in
    tests) timeout 560 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} > "$out/tests.log" 2>&1 ;;
    embed) CUDA_VISIBLE_DEVICES=${GPUS:-0} EMBED_BENCH_LOG="$out/embed-timeline-{sentences}.txt" timeout 560 python3 bench/embed.py --sentences ${EMBED_SIZES:-20000 100000} --partitions 4 \
             --baseline raw_vllm > "$out/embed.log" 2>&1 ;;
    2gpu) CUDA_VISIBLE_DEVICES=${GPUS:-0,1} PARTITIONS=20 ROWS=500 MAX_TOKENS=32 SYSTEMS="llm_assets llm_assets_2gpu" \
            timeout 420 bash bench/run.sh /tmp/bench-2gpu 1b > "$out/2gpu.log" 2>&1
          tar czf "$out/2gpu.tgz" -C /tmp/bench-2gpu --exclude=landing --exclude='llama-*' . ;;
    tp|tp4|pp) [ "$step" = pp ] && parallel="PP=2" || parallel="TP=2"
        [ "$step" = tp4 ] && systems=${TP4_SYSTEMS:-raw_vllm llm_assets_2gpu} gpus=0,1,2,3 || systems="raw_vllm llm_assets" gpus=${GPUS:-0,1}
        env $parallel PARTITIONS=4 ROWS=1000 MAX_TOKENS=64 CUDA_VISIBLE_DEVICES=$gpus SYSTEMS="$systems" \
          timeout 560 bash bench/run.sh "/tmp/bench-$step" 8b >> "$out/$step.log" 2>&1
        tar czf "$out/$step.tgz" -C "/tmp/bench-$step" --exclude=landing --exclude='llama-*' . ;;
    sglang) PYTHONPATH="/tmp/site-sglang:$PYTHONPATH" timeout 420 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py \
              -k sglang > "$out/sglang.log" 2>&1 ;;
    *) echo "unknown step $step" ;;
  esac
  echo "   $step ended with $? at $(date -u +%T)"
done
