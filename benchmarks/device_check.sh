#!/usr/bin/env bash
# The GPU checks of the DINO trainer (issue 5) in one call, for a session lent a device machine.
#
# The device image has python3 (3.12) with torch, timm, typer, rich, scikit-learn, pyarrow, matplotlib and pytest,
# but not lancedb, faiss or openslide, and it cannot download. Fetch their wheels here first (they travel with the
# working tree; .whl/ stays out of git):
#
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       lancedb lance-namespace lance-namespace-urllib3-client deprecation overrides openslide-python openslide-bin faiss-cpu
#
# then, with the device tool: run `bash benchmarks/device_check.sh` (timeout_s 560), then give_back.
# What comes back in $OUT: gpu.txt (the GPU, versions), gpu_tests.log (tests/test_gpu.py), train_step.json and
# train_step.log (benchmarks/train_step.py --gpu: ViT-S/16 at batch 192 and ResNet50 at batch 256, bf16).
set -uo pipefail
OUT=${OUT:-/tmp/cytoretrieve-device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --find-links .whl .whl/*.whl 2>&1 | tail -3
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 280 python3 benchmarks/train_step.py --gpu --quick --json "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.log"
