#!/usr/bin/env bash
# One device call: GPU parity (float32 and bfloat16), then the 2048x2048 four-step benchmark against
# upstream PyTorch (bf16 autocast) on the same card, then the 4096x4096 v1.5 memory check.
#
# Prepare here (once), then run through the device tool with carry [".whl", ".fx", "ref"]:
#   bash scripts/prepare_device.sh
#   command: bash scripts/device_check.sh      timeout_s: 540
# The device image already has jax (CUDA), flax, orbax, torch; only loguru (for upstream) travels.
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
run() { echo "+ $*"; timeout 300 "$@" 2>&1 | tail -n 25; }
FX=.fx
for dt in float32 bfloat16; do
  for v in v1_flux v1pt5_flux2; do
    run python3 -m pid_jax.cli parity --checkpoint $FX/$v/model_ema_bf16.pth --config $FX/$v/config.json \
      --io $FX/$v/io.npz --dtype $dt | tail -n 1 | sed "s/^/[$v $dt] /" | tee -a "$OUT/parity.txt"
  done
done
run python3 -m pid_jax.cli parity --checkpoint $FX/v1_flux/model_ema_bf16.pth --config $FX/v1_flux/config.json \
  --sampler $FX/v1_flux_4step.npz | tail -n 1 | sed "s/^/[sampler f32] /" | tee -a "$OUT/parity.txt"
# Speed: pid-jax bf16 against upstream bf16 autocast, same shapes, same card, same run.
run python3 -m pid_jax.cli bench --preset flux_2k --random-weights --size 2048x2048 --steps 4 --batch 1 \
  --dtype bfloat16 --repeats 5 --torch-reference ref --torch-python python3 --json | tee "$OUT/bench_2048.txt"
# Memory at 4K with the v1.5 network (target: within 24 GB).
run python3 -m pid_jax.cli bench --preset flux_2kto4k_v1pt5 --random-weights --size 4096x4096 --steps 4 \
  --dtype bfloat16 --repeats 2 --json | tee "$OUT/bench_4096.txt"
echo "== summary"; cat "$OUT/gpu.txt" "$OUT/parity.txt"
grep -h '^{' "$OUT"/bench_*.txt | python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    t = r.get("torch", {}).get("median_s")
    print(f"{r[\"preset\"]:<20} {r[\"size\"]:>9} median {r[\"median_s\"]:.3f} s  peak {r[\"peak_bytes\"]/2**30:.2f} GiB  "
          f"{r[\"tflops\"]:.0f} TFLOP/s" + (f"  torch {t:.3f} s  speedup {r[\"speedup_vs_torch\"]:.2f}x" if t else ""))'
