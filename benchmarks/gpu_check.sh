#!/usr/bin/env bash
# The GPU checks, for the day a GPU is lent: in under 8 minutes on one GPU, every figure printed with
# the GPU's name. One command: `timeout 480 bash benchmarks/gpu_check.sh [OUT_DIR]`;
# `bash benchmarks/gpu_check.sh --help` (or --dry-run) prints what it would run and runs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-gpu-check}
DRY=0
case "${1:-}" in
    -h|--help|--dry-run) DRY=1 ;;
    "") ;;
    *) OUT=$1 ;;
esac
[ "$DRY" -eq 1 ] || mkdir -p "$OUT"

run() {  # print the step, run it unless dry
    echo "+ $*"
    [ "$DRY" -eq 1 ] || "$@"
}

[ "$DRY" -eq 1 ] && echo "gpu_check.sh would run, in order (figures go to $OUT/):"
run "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
# GPU-only tests (skip-unless-cuda) and the mixed-precision and compile tests, on the GPU's machine
run "$PY" -m pytest -q -rs tests/test_mixed_precision.py tests/test_compile.py
# throughput: images/s, peak memory, MFU against the matmul peak in each precision, eager and compiled
BENCH=benchmarks/benchmark_throughput.py
run timeout 240 "$PY" "$BENCH" --config cifar-small cifar10 --device cuda \
    --precision fp32 bf16 fp16 --compile both --warmup 3 --steps 10 --json "$OUT/throughput.json"
# one epoch through Ray Train on the GPU, then evaluate.py on that run
run timeout 150 "$PY" studies/train.py --dataset photo-patches --scale small --set epochs=1 --workers 1 \
    --gpus-per-worker 1 --storage-path "$OUT/runs" --tracking-uri "sqlite:///$PWD/$OUT/mlflow.db" --download
if [ "$DRY" -eq 1 ]; then
    echo "+ $PY studies/evaluate.py $OUT/runs/<the run> --gpus-per-worker 1 --iw-samples 100 --max-test-images 256"
else
    RUN_DIR=$(ls -d "$OUT"/runs/*/ | head -n 1)
    run timeout 90 "$PY" studies/evaluate.py "$RUN_DIR" --gpus-per-worker 1 --iw-samples 100 \
        --max-test-images 256 --out "$OUT/evaluation"
    "$PY" - "$OUT" <<'PY'
import json, pathlib, sys
import torch
out = pathlib.Path(sys.argv[1])
gpu = torch.cuda.get_device_name(0)
for row in json.loads((out / "throughput.json").read_text()):
    print(gpu, "|", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
for f in sorted(out.glob("evaluation/*.json")):
    print(gpu, "|", f.name, f.read_text().strip()[:400])
PY
fi
