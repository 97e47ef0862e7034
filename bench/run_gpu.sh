#!/usr/bin/env bash
# The GPU run, for a lent CUDA machine (15 minutes of device time in all, 10 minutes a command), in three
# stages of one command each, every stage under 5 minutes including the install:
#
#   bash bench/run_gpu.sh 1   # ~4 min: GPU tests (tests/ops/test_gpu.py: compiled kernels vs the reference,
#                             #   bitwise split-K, the layers' transposed B, bf16 Llama vs PEFT, n_spills of
#                             #   the loaded kernels vs compile-check, CUDA-graph replay of a patched decode
#                             #   step, torch.compile, backward), then the headline benchmarks: the design
#                             #   decode shape and prefill 8 x 512 (kernels-headline.json) and routed
#                             #   generation at batch 32 (generation-headline.json)
#   bash bench/run_gpu.sh 2   # ~4 min: the rest of the kernel sweep (kernels-rest.json), generation at
#                             #   batch 1 and 8 (generation.json), MiLoRA top-2 of 7 served sparsely vs
#                             #   plain LoRA vs the base model, prefill and decode, batch 1 and 8, 5 rounds
#                             #   (bench_milora.py speed --device cuda: milora.json)
#   bash bench/run_gpu.sh 3   # ~2 min: one planned call over 32 rows using 1..64 distinct adapters and
#                             #   over 8..128 rows at fixed D, decode and prefill, K x N = 576 x 576,
#                             #   576 x 1536 and 4096 x 4096, bf16 (bench_many_adapters.py --device cuda:
#                             #   many_adapters.json + .png): does the time follow the distinct adapter
#                             #   bytes? Not run yet: its GPU numbers are pending a lent GPU (the CPU
#                             #   sweep is bench/results/cpu/many_adapters.json)
#
# Step limits add up to 30 + 120 + 45 + 90 = 285 s (stage 1) and 30 + 140 + 60 + 60 = 290 s (stage 2), so
# a stage never passes 5 minutes; with the machine's start (1-2 minutes) both fit 15 minutes of device
# time. Stage 3 (30 + 90 = 120 s) fits beside them only when they end early: run it in a session of its
# own otherwise. The kernel sweep of stage 2 gave 60 s to the MiLoRA step (it was 200 s): a sweep cut
# off keeps the rows it measured.
# Run stage 1 first. Each step has its own time limit (timeout) and prints its elapsed time; every
# benchmark rewrites its JSON after each row (bench_milora.py after each batch size), so a step cut off
# still leaves what it measured. Results land in bench/results/<gpu>/ and, when the device tool's $OUT
# is set, are copied there as they come. The machine has torch, triton, transformers, peft and pytest
# and no network: the package is installed without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
stage="${1:-1}"
start=$SECONDS
status=0
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

step() {  # step <seconds> <label> <command...>: run with a time limit, print its elapsed time
    local limit=$1 label=$2
    shift 2
    local t0=$SECONDS
    echo "=== $label (limit ${limit}s)"
    timeout "$limit" "$@" || { echo "=== $label: exit $?"; status=1; }
    echo "=== $label: $((SECONDS - t0)) s (stage total $((SECONDS - start)) s)"
    if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/results" && cp -r bench/results/. "$OUT/results/" 2>/dev/null; fi
}

step 30 install python -m pip install --quiet --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
gpu_dir=$(python -c "import sys; sys.path.insert(0, 'bench'); import common; print(common.results_dir('cuda'))")

case "$stage" in
1)
    step 120 "GPU tests" python -m pytest tests/ops/test_gpu.py -q -p no:cacheprovider
    step 45 "kernels: headline" python bench/bench_kernels.py --device cuda --stage headline
    step 90 "generation: batch 32" python bench/bench_generation.py --device cuda --quick --batches 32 \
        --out "$gpu_dir/generation-headline.json"
    ;;
2)
    step 140 "kernels: the rest of the sweep" python bench/bench_kernels.py --device cuda --stage rest
    step 60 "generation: batch 1, 8" python bench/bench_generation.py --device cuda --quick --batches 1,8
    step 60 "MiLoRA serving: batch 1, 8" python bench/bench_milora.py speed --device cuda --rounds 5
    ;;
3)
    step 90 "many distinct adapters" python bench/bench_many_adapters.py --device cuda
    ;;
*)
    echo "usage: bash bench/run_gpu.sh 1|2|3" >&2
    exit 2
    ;;
esac
echo "stage $stage: $((SECONDS - start)) s, exit $status"
exit $status
