#!/usr/bin/env bash
# The GPU suite, for a lent CUDA machine: no edits needed. Installs the package without dependencies
# (the machine has torch, triton, transformers, peft, pytest preinstalled and no network), runs the
# GPU tests, then the kernel benchmarks. Results land in bench/results/<device>/ and, when the device
# tool's $OUT is set, are copied there too.
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
status=0
python -m pytest tests/test_gpu.py -q 2>&1 | tail -15 || status=1
python -m dlplora_triton.cli bench --device cuda ${BENCH_ARGS:-} 2>&1 | tail -80 || status=1
python bench/bench_generation.py --device cuda ${BENCH_ARGS:-} 2>&1 | tail -10 || status=1
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results" && cp -r bench/results/. "$OUT/results/"
fi
exit $status
