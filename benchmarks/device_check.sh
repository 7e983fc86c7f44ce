#!/usr/bin/env bash
# On a lent GPU machine, from the repository root (the device tool's run; results come back from $OUT):
#   bash benchmarks/device_wheels.sh                      # here first: .whl/ with datasets & co
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=540)
#   run(command="bash benchmarks/device_check.sh tests", ...)   # only the gpu tests (up to 420 s)
#   run(command="bash benchmarks/device_check.sh bench", ...)   # only benchmarks/gpu.py
# Installs the carried wheels, records the machine, runs the GPU tests (pytest -m gpu: the cuda
# cases of tests whose cpu cases CI runs) and benchmarks/gpu.py, in under 8 minutes. Writes
# $OUT/env.txt, gpu_tests.log, gpu_bench.log, gpu_table.md (rewritten after every row, so a
# cut-off run still returns what it measured) and gpu_table.runs.log.
set -uo pipefail
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export PYTHONWARNINGS=ignore::DeprecationWarning
start=$SECONDS
PY=python3
mode=${1:-all}  # all | tests | bench
case $mode in
  all) test_budget=280 ;;
  tests) test_budget=420 ;;
  bench) test_budget=0 ;;
  *) echo "device_check: mode must be all, tests or bench (got $mode)"; exit 2 ;;
esac

if ls .whl/*.whl >/dev/null 2>&1; then
  wheels=$(ls .whl/*.whl | grep -v '/pyarrow-')
  # datasets needs pyarrow >= 24: carry ours only where the machine's is older
  if ! $PY -c "import sys, pyarrow; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null; then
    wheels="$wheels $(ls .whl/pyarrow-*.whl 2>/dev/null)"
  fi
  # shellcheck disable=SC2086
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    || echo "device_check: installing the carried wheels failed"
  export PYTHONPATH=/tmp/site
else
  echo "device_check: no .whl/ carried (bash benchmarks/device_wheels.sh, then carry .whl); datasets may be missing"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  nproc
  $PY - <<'PY'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "torchvision", "accelerate", "datasets", "pyarrow", "PIL", "numpy"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as exc:
        print(name, "NOT IMPORTABLE:", exc)
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# the gpu tests, issue 26's included: SyncBatchNorm conversion, fp16 <-> bf16 resume, strict
# deterministic reruns, the nvJPEG fallback and test_cuda_ordinary_steps_do_not_sync (training under
# torch.cuda.set_sync_debug_mode("error") on every ordinary step; tests/scripts/cuda_sync_check.py)
if [ "$test_budget" -gt 0 ]; then
  echo "== pytest -m gpu (up to $test_budget s)"
  timeout "$test_budget" $PY -m pytest -q -p no:cacheprovider -m gpu --continue-on-collection-errors -rs \
    --durations=15 tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -45
fi

left=$((470 - (SECONDS - start)))
echo "== benchmarks/gpu.py ($left s left)"
if [ "$mode" = tests ]; then
  echo "device_check: mode tests: benchmarks/gpu.py not run"
elif [ $((left - 150)) -ge 60 ]; then
  timeout "$left" $PY benchmarks/gpu.py --budget-s $((left - 150)) --out "$OUT/gpu_table.md" 2>&1 \
    | tee "$OUT/gpu_bench.log" | tail -40
else
  echo "device_check: the gpu tests left too little time for benchmarks/gpu.py; skipped"
fi
echo "device_check: done in $((SECONDS - start)) s"
