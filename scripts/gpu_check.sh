#!/usr/bin/env bash
# The GPU checks, in one run, on a machine with a CUDA device and PyTorch already installed
# (the suite itself never needs a GPU). Usage, from the repository root:
#
#   scripts/gpu_check.sh [OUTDIR] [BENCH ...]
#
# 1. the device tests (CUDA against the CPU, graph replay) and the attack tests with
#    device "auto" resolving to CUDA, so every attack of the catalogue runs on the GPU;
# 2. the benchmarks with --device cuda (default: all but `load`, which needs Postgres).
# Each part has its own time limit so one hang cannot eat the others; the log and
# bench/results/*.json are copied to OUTDIR (default: runs/gpu_check).
set -u
out=${1:-runs/gpu_check}
shift || true
benches=${*:-gc_feature input_space fm_throughput extraction evaluation memory}
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  echo "== tests (CUDA) =="
  timeout 120 $py -m pytest -q -s -p no:cacheprovider tests/test_device.py 2>&1 | tail -30
  echo "device tests rc=${PIPESTATUS[0]}"
  timeout 240 $py -m pytest -q -p no:cacheprovider -m "not slow" tests/test_head.py \
    tests/test_catalogue.py tests/test_pipeline.py tests/test_input_attacks.py tests/test_emn.py \
    tests/test_decoder_inversion.py tests/test_scenario.py tests/test_defences.py tests/test_stage_cache.py \
    tests/test_encoders.py 2>&1 | tail -40
  echo "tests rc=${PIPESTATUS[0]}"
  for b in $benches; do
    echo "== bench $b =="
    timeout 150 $py -m bench --device cuda "$b" 2>&1
    echo "bench $b rc=$?"
    cp "bench/results/$b.json" "$out"/ 2>/dev/null
  done
  date -u
} 2>&1 | tee "$log"
