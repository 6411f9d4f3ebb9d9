#!/usr/bin/env bash
# The GPU check, as one short run on a lent GPU machine (PyTorch with CUDA, onnx and onnxruntime, no gemx
# install): the GPU test suite, then scripts/gpu_torch_cuda.py's table and JSON into $OUT.
#     OUT=/tmp/gpu bash scripts/gpu_check.sh
set -u
export PYTHONPATH=$PWD GEMX_CACHE=$OUT/cache
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch,onnx,onnxruntime;print('torch',torch.__version__,'onnx',onnx.__version__,'ort',onnxruntime.__version__)"
for m in av polygraphy typer rich onnxscript matplotlib PIL pytest; do python -c "import $m" 2>/dev/null || echo "missing $m"; done
timeout 300 python -m pytest -q -p no:cacheprovider tests/runtimes/test_gpu.py -rs 2>&1 | tail -12
timeout 240 python scripts/gpu_torch_cuda.py "$OUT/torch_cuda.json" 2>&1 | tee "$OUT/torch_cuda.txt" | tail -8
rm -rf "$OUT/cache"
