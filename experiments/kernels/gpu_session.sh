#!/usr/bin/env bash
# One device call for the GPU issue: environment, kernel tests compiled on the GPU, kernel benchmarks
# with the tile sweep, decode at realistic sizes. Run from the repository root on the GPU machine;
# results go to $OUT (default results/gpu). Each step has its own time limit so one stall cannot
# take the others' numbers with it.
set -u
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# No pip install there: kernels/ is mapped to mtp_spec.kernels by pyproject; a link does the same.
[ -e mtp_spec/kernels ] || ln -s ../kernels mtp_spec/kernels
export PYTHONPATH=$PWD
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,driver_version --format=csv | tee "$OUT/env.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
timeout "${T_TEST:-120}" $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fp8.py 2>&1 \
  | tail -25 | tee "$OUT/pytest.log"
timeout "${T_KERN:-220}" $PY experiments/kernels/bench_kernels.py ${KERN_ARGS:-} --out "$OUT/bench_kernels.json" 2>&1 \
  | tee "$OUT/bench_kernels.log"
timeout "${T_DEC:-180}" $PY experiments/bench_gpu_decode.py --out "$OUT/gpu_decode.json" 2>&1 \
  | tee "$OUT/gpu_decode.log"
