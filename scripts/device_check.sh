#!/usr/bin/env bash
# One device call (issue #12), most important first so that a cut-off run still reports it:
#  (1) 2048x2048 against upstream PyTorch (bf16 autocast), same card, same run
#  (2) GPU parity, float32 and bfloat16 (fixtures), sampler replay
#  (3) 4096x4096 (v1.5 network) against upstream (pixel blocks chunked, the default above 2K)
#  (a) attention microbenchmark at the exact 2K shapes (cuDNN vs Mosaic-GPU split vs FP8, pixel head padding)
#  (4) 2048x2048 kernel-time profile (JAX profiler, read back with jax.profiler.ProfileData)
#  (5) batch sweep 1,2,4,8 at 2048x2048
#  (6) second-process compile at 2048 and 4096 (persistent cache incl. XLA's autotune/kernel caches)
#  (7) opt-in attention paths at full size: error vs pid-jax float32, PSNR vs the bf16 decode, time
#  (8) 4096x4096 without chunking (the speed the chunking costs), 8192x8192 peak memory
# Prepare here: bash scripts/prepare_device.sh (and an upstream checkout at ./ref); then through the device
# tool with carry [".whl", ".fx", "ref", ".old"] (.old: the previous code, for the baseline), command `bash scripts/device_check.sh`, timeout_s ~570.
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
T_END=$(( $(date +%s) + ${BUDGET_S:-560} ))
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
# The package maps configs/ and convert/ into pid_jax (pyproject package-dir); without an install, link them.
[ -e pid_jax/configs ] || ln -s ../configs pid_jax/configs
[ -e pid_jax/convert ] || ln -s ../convert pid_jax/convert
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PID_JAX_COMPILATION_CACHE=${PID_JAX_COMPILATION_CACHE:-/tmp/pidjax-xla-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
left() { echo $(( T_END - $(date +%s) )); }
# run SECONDS LOG cmd...: at most SECONDS (or what is left), output to $OUT/LOG, the tail shown.
run() {
  local s=$1 log=$2; shift 2
  local l; l=$(left); (( l < s )) && s=$l
  if (( s < 15 )); then echo "== skip $log (time)"; return 1; fi
  echo "== $log (<= ${s}s) $(date +%T)"
  timeout "$s" "$@" > "$OUT/$log" 2>&1; local rc=$?
  tail -n 14 "$OUT/$log"; echo "   rc=$rc"; return $rc
}
B="python3 -m pid_jax.cli bench --random-weights --steps 4 --dtype bfloat16 --json"
# (1)
run 150 bench_2048.txt $B --preset flux_2k --size 2048x2048 --repeats 5 --torch-reference ref --torch-python python3
# (1b) the code before this change (bf16 fully in bf16), same card, same run: the precision change's cost
[ -d .old/pid_jax ] && PYTHONPATH=/tmp/site:$PWD/.old run 45 baseline_old_2048.txt $B --preset flux_2k \
  --size 2048x2048 --repeats 3
# (2) five small processes side by side
( FX=.fx
  for dt in float32 bfloat16; do for v in v1_flux v1pt5_flux2; do
    ( python3 -m pid_jax.cli parity --checkpoint $FX/$v/model_ema_bf16.pth --config $FX/$v/config.json \
        --io $FX/$v/io.npz --dtype $dt 2>&1 | tail -n 1 | sed "s/^/[$v $dt] /" > "$OUT/parity_${v}_$dt.txt" ) &
  done; done
  ( python3 -m pid_jax.cli parity --checkpoint $FX/v1_flux/model_ema_bf16.pth --config $FX/v1_flux/config.json \
      --sampler $FX/v1_flux_4step.npz 2>&1 | tail -n 1 | sed "s/^/[sampler f32] /" > "$OUT/parity_sampler.txt" ) &
  wait ) ; cat "$OUT"/parity_*.txt | tee "$OUT/parity.txt"
# (3)
run 170 bench_4096.txt $B --preset flux_2kto4k_v1pt5 --size 4096x4096 --repeats 2 --torch-reference ref --torch-python python3
# (a)
run 75 attn_2048.txt python3 scripts/attn_bench.py --sizes 2048 --out "$OUT/attn_2048.json"
# (4)
run 70 profile_2048.txt python3 scripts/profile_decode.py --preset flux_2k --size 2048x2048 --out "$OUT/profile_2048.json"
# (5)
run 100 sweep_2048.txt $B --preset flux_2k --size 2048x2048 --batch 1,2,4,8 --repeats 2
# (6) second process: the persistent cache (executables, autotuning, kernels) should make this a load
export JAX_DEBUG_LOG_MODULES=jax._src.compiler,jax._src.compilation_cache
run 45 compile2_2048.txt $B --preset flux_2k --size 2048x2048 --repeats 1
run 70 compile2_4096.txt $B --preset flux_2kto4k_v1pt5 --size 4096x4096 --repeats 1
unset JAX_DEBUG_LOG_MODULES
# (7)
run 120 decode_error_2048.txt python3 scripts/decode_error.py --preset flux_2k --size 2048x2048 --impls auto,mgpu,fp8 \
  --out "$OUT/decode_error_2048.json"
# (8)
run 120 plain_4096.txt $B --preset flux_2kto4k_v1pt5 --size 4096x4096 --repeats 1 --pixel-chunk 0
run 200 chunk_8192.txt $B --preset flux_2kto4k_v1pt5 --size 8192x8192 --steps 1 --repeats 1
run 100 attn_4096.txt python3 scripts/attn_bench.py --sizes 4096 --quick --out "$OUT/attn_4096.json"

echo "== summary ($(cat "$OUT/gpu.txt" | head -1))"
cat "$OUT/parity.txt"
grep -h "Persistent compilation cache hit\|Not writing\|cache miss\|Writing .* to persistent" "$OUT"/compile2_*.txt 2>/dev/null | sort | uniq -c | head -8
grep -h "^== attention" -A40 "$OUT"/attn_*.txt 2>/dev/null | grep -v "^== attention" | head -30
grep -h "^== profile" -A12 "$OUT/profile_2048.txt" 2>/dev/null
grep -h "^== decode error" -A6 "$OUT/decode_error_2048.txt" 2>/dev/null
python3 scripts/device_summary.py "$OUT"
