#!/usr/bin/env bash
# One device call for the Qwen-Image VAE: tests and fixture parity on the GPU (float32, bfloat16), then
# full-size encode/decode timings and peak memory against upstream's WanVAE2d_ in the same run.
# Prepare here: copy ../shared/fixtures/vae/qwenimage to .vaewan/fx and upstream's
# pid/_src/tokenizers/qwenimage_vae.py to .vaewan/ref/pid/_src/tokenizers/ (.vaewan is git-ignored), then run
# through the device tool with carry [".vaewan"]:  bash scripts/device_check_vae_wan.sh   (timeout_s 480)
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# The installed layout without installing (this copy of the tree only): pid_jax.convert and pid_jax.configs
# are the repository's convert/ and configs/.
[ -e pid_jax/convert ] || ln -s ../convert pid_jax/convert
[ -e pid_jax/configs ] || ln -s ../configs pid_jax/configs
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_vae_wan.py 2>&1 | tail -n 3
for fx in .vaewan/fx tests/data/vae/qwenimage; do for dt in float32 bfloat16; do
  timeout 90 python3 -m pid_jax.cli parity --vae qwenimage --checkpoint $fx/QwenImage_VAE_2d.pth --io $fx/io.npz \
    --config $fx/config.json --dtype $dt 2>&1 | sed "s#^#[$fx $dt] #" | tee -a "$OUT/parity.txt"
done; done
for args in "--size 1024x1024 --dtype bfloat16" "--size 1024x1024 --dtype float32" "--size 2048x2048 --dtype bfloat16"; do
  timeout 120 python3 scripts/bench_vae_wan.py $args --repeats 5 --torch-reference .vaewan/ref 2>&1 \
    | grep -v Warning | tee -a "$OUT/bench.txt"
done
