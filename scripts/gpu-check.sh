#!/usr/bin/env bash
# The one short GPU check (a few minutes on one GPU): every `gpu`-marked test, with the figures
# they print (peak memory and time of a random-weight ViT-L-14 ClusPro step in bf16, a whole
# embedded-world ClusPro epoch). Writes the log to ${OUT:-.}/gpu-check.log; copy the figures into
# docs/backbone.md ("GPU") with the GPU's name.
set -euo pipefail
out="${OUT:-.}"
python=${PYTHON:-.venv/bin/python}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
  "$python" -m pytest -q -m gpu -s -rs -p no:cacheprovider tests/
} 2>&1 | tee "$out/gpu-check.log"
