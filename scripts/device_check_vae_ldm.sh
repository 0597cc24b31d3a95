#!/usr/bin/env bash
# One device call for the LDM VAEs (flux, sd3, sdxl, flux2): their tests and compact-fixture parity on the GPU
# (float32, bfloat16), then full-size random-weight encode/decode timings at 1024x1024.
# Nothing to prepare (the compact fixtures in tests/data travel with the tree). Through the device tool:
#   bash scripts/device_check_vae_ldm.sh        (timeout_s 420)
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PID_JAX_FIXTURES=$PWD/tests/data
# The installed layout without installing: pid_jax.convert and pid_jax.configs are convert/ and configs/.
[ -e pid_jax/convert ] || ln -s ../convert pid_jax/convert
[ -e pid_jax/configs ] || ln -s ../configs pid_jax/configs
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_vae_ldm.py 2>&1 | tail -n 3
fx=tests/data/vae
for k in flux:ae sdxl:sdxl_vae flux2:flux2_ae; do for dt in float32 bfloat16; do
  timeout 60 python3 -m pid_jax.cli parity --vae ${k%%:*} --checkpoint $fx/${k%%:*}/${k##*:}.safetensors \
    --io $fx/${k%%:*}/io.npz --config $fx/${k%%:*}/config.json --dtype $dt 2>&1 | tail -n 1 \
    | sed "s#^#[${k%%:*} $dt] #" | tee -a "$OUT/parity.txt"
done; done
for dt in bfloat16 float32; do
  timeout 120 python3 scripts/bench_vae_ldm.py --kinds flux,flux2 --size 1024x1024 --dtype $dt --repeats 5 2>&1 \
    | grep -v Warning | tee -a "$OUT/bench.txt"
done
