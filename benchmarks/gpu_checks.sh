#!/usr/bin/env bash
# The GPU check of a session with a lent device, as one script (run from the repository root by the
# device tool, which sets $OUT). It carries transformers 5.24 / tokenizers 0.23.3 wheels in .whl/.
# Guard overhead on a Llama-3-8B-shaped random model, bf16, batch 1 and 32 (issue 2's GPU goal), at 64
# new tokens and at 256 (the extra forward that scores the final token is 1/(n+1) of the decoding).
# CHECK=split runs benchmarks/hook_cost.py instead: where the guard's cost goes on the 8B model (batch
# 1 and 32, 64 tokens), arm by arm. CHECK=step runs benchmarks/step_cost.py: the Monitor's cost per
# decoding step on the 8B model, from single forwards (no generate around them, so far less noise).
# CHECK=vllm runs benchmarks/engine_load.py: plain vLLM vs vLLM with the probe in its forward, on the 8B
# shape (needs vLLM's CUDA build already on the device).
# CHECK=static runs benchmarks/overhead.py --static: with a static cache transformers compiles the
# decoding step (CUDA graphs), plain and guarded (the guard's tensor-only hooks, graph.py), beside plain
# generation with compilation off (issue 25's compiled-decoding check; goal guarded / plain >= 0.99).
# GRID=1 also runs the organism design grid first (benchmarks/organism_grid.py, 4 designs x 2 seeds).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
OUT=${OUT:-/tmp/hguard-gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } 2>&1 | tee "$OUT/log.txt"
if [ "${GRID:-0}" = 1 ]; then
  python3 benchmarks/organism_grid.py --device cuda --out /tmp/grid --pack 2 --deadline "${GRID_DEADLINE:-360}" 2>&1 | tee -a "$OUT/log.txt"
  cp /tmp/grid/grid.json /tmp/grid/*.tar "$OUT/" 2>/dev/null
fi
if [ "${CHECK:-overhead}" = vllm ]; then
  # plain vLLM against hguard serve --engine vllm (CUDA graphs on, bf16) on a Llama-3-8B-shaped random
  # model, 1 and 32 streaming clients (issue: hguard inside vLLM; goal: guarded / plain >= 0.99). The
  # device has no network: vLLM's CUDA build must be installed there already.
  if ! python3 -c "import vllm" 2>/dev/null; then
    echo "CHECK=vllm: vLLM is not installed on this device (and cannot be: no network); nothing measured" | tee -a "$OUT/log.txt"
    exit 0
  fi
  timeout "${OVERHEAD_LIMIT:-540}" python3 benchmarks/engine_load.py --json --models llama8b --dtype bfloat16 \
    --clients 1 32 --rounds "${REPEATS:-4}" --logs "$OUT" > "$OUT/engine-load-8b.json" 2> >(tee -a "$OUT/log.txt" >&2)
  echo "engine_load rc $?" | tee -a "$OUT/log.txt"
  exit 0
fi
if [ "${CHECK:-overhead}" = static ]; then
  timeout "${OVERHEAD_LIMIT:-480}" python3 benchmarks/overhead.py --json --preset 8b --dtype bfloat16 --batches ${BATCHES:-1 32} \
    --new-tokens "${NEW_TOKENS:-64}" --repeats "${REPEATS:-4}" --static \
    > "$OUT/overhead-static-8b.json" 2> >(tee -a "$OUT/log.txt" >&2)
  echo "overhead --static rc $?" | tee -a "$OUT/log.txt"
  cat "$OUT/overhead-static-8b.json"
  exit 0
fi
if [ "${CHECK:-overhead}" = split ]; then
  timeout "${OVERHEAD_LIMIT:-420}" python3 benchmarks/hook_cost.py --json --preset 8b --device cuda --dtype bfloat16 \
    --batches 1 32 --neurons 458 --new-tokens "${NEW_TOKENS:-64}" --repeats "${REPEATS:-8}" \
    > "$OUT/hook-cost-8b.json" 2> >(tee -a "$OUT/log.txt" >&2)
  echo "hook_cost rc $?" | tee -a "$OUT/log.txt"
  exit 0
fi
if [ "${CHECK:-overhead}" = step ]; then
  timeout "${OVERHEAD_LIMIT:-420}" python3 benchmarks/step_cost.py --json --preset 8b --device cuda --dtype bfloat16 \
    --batch 1 32 --rounds "${REPEATS:-16}" > "$OUT/step-cost-8b.json" 2> >(tee -a "$OUT/log.txt" >&2)
  echo "step_cost rc $?" | tee -a "$OUT/log.txt"
  exit 0
fi
timeout "${OVERHEAD_LIMIT:-420}" python3 benchmarks/overhead.py --json --preset 8b --dtype bfloat16 --batches 1 32 \
  --new-tokens ${NEW_TOKENS:-64 256} --repeats "${REPEATS:-8}" > "$OUT/overhead-8b.json" 2> >(tee -a "$OUT/log.txt" >&2)
echo "overhead rc $?" | tee -a "$OUT/log.txt"
cat "$OUT/overhead-8b.json"
