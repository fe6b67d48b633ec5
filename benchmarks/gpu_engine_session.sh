#!/usr/bin/env bash
# One GPU-machine session for the engine: its GPU tests, then the throughput benchmark.
# Usage (from the repo root, after installing the project): bash benchmarks/gpu_engine_session.sh OUT_DIR [WORKLOADS]
set -u
out=${1:-/tmp/engine-gpu}; workloads=${2:-b1,b64,7b,nano,prefix}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_paged_kernels.py tests/test_fused_kernels.py tests/test_engine_gpu.py 2>&1 | tail -25 | tee "$out/gpu_tests.txt"
timeout 420 python3 benchmarks/generate_throughput.py --workloads "$workloads" --repeats 3 --json "$out/generate.json" 2>&1 | grep -v "Writing model\|Loading weights" | tail -40 | tee "$out/generate.txt"
