"""Time the full-size Gemma-2-2b caption encoder forward and report peak host memory (random weights).

Usage: python scripts/bench_gemma.py [--length 420] [--batch 1] [--dtype bfloat16] [--repeats 2]

Parameters are random (no download), stored in bfloat16 as the released checkpoint is; ``--dtype`` is the
compute dtype (bfloat16 is what upstream runs). The real sequence length is
``len(tokens(CHI prompt) with <bos>) + 298``; without the real tokenizer, ~420 is a plausible stand-in.
Run one configuration per process: peak RSS is per process.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pid_jax.gemma.config import GemmaConfig
from pid_jax.gemma.modeling import abstract_gemma, make_forward

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "manifests" / "gemma-2-2b-it.json"


def rss_gib() -> tuple[float, float]:
    """(current, peak since the last reset_peak()) resident set size in GiB (Linux /proc)."""
    with open("/proc/self/status") as fh:
        fields = {line.split(":")[0]: int(line.split()[1]) for line in fh if line.startswith(("VmRSS", "VmHWM"))}
    return fields["VmRSS"] / 2**20, fields["VmHWM"] / 2**20


def reset_peak() -> None:
    """Reset VmHWM so the forward's peak is not hidden by the (bench-only) weight generation."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def random_state(cfg: GemmaConfig, param_dtype: str) -> nnx.State:
    """Fill the abstract parameter tree leaf by leaf (no float32 copy of the whole model).

    Drawing 2.6e9 normals takes minutes on a small CPU, so each tensor repeats one random block of 2**20
    values (offset per tensor); that is as good as any random weights for timing and memory.
    """
    flat = dict(nnx.to_flat_state(nnx.state(abstract_gemma(cfg, param_dtype=param_dtype), nnx.Param)))
    block = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    for i, (path, var) in enumerate(flat.items()):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if path[-2].endswith("norm"):
            value = np.zeros(shape, np.float32)
        else:
            scale = 0.02 if path[0] == "embed_tokens" else shape[-1] ** -0.5
            value = np.resize(np.roll(block, i) * np.float32(scale), shape)
        var.set_value(jnp.asarray(value, dtype).block_until_ready())
        del value
    return nnx.from_flat_state(flat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=420)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--param-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layers", type=int, default=0, help="use only the first N layers (0: all 26)")
    args = ap.parse_args()

    conf = json.loads(MANIFEST.read_text())["config"]
    if args.layers:  # fewer layers at full width, for quick memory experiments
        conf = {**conf, "num_hidden_layers": args.layers, "layer_types": conf["layer_types"][: args.layers]}
    cfg = GemmaConfig.from_dict(conf)
    t0 = time.perf_counter()
    state = random_state(cfg, args.param_dtype)
    t_init = time.perf_counter() - t0
    n_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    cur, peak = rss_gib()
    print(f"{jax.devices()[0]}: params {n_bytes / 2**30:.2f} GiB ({args.param_dtype}), init {t_init:.1f} s")
    print(f"rss after init: {cur:.2f} GiB (peak {peak:.2f})")

    graphdef, _ = nnx.split(abstract_gemma(cfg, param_dtype=args.param_dtype, dtype=args.dtype))
    forward = make_forward(graphdef)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (args.batch, args.length)).astype(np.int32)
    ids[:, 0] = cfg.bos_token_id
    mask = np.ones_like(ids)
    mask[:, args.length // 2 :] = 0  # short caption: the tail is padding, as for most captions
    ids[mask == 0] = cfg.pad_token_id
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    reset_peak()
    t0 = time.perf_counter()
    compiled = forward.lower(state, ids, mask).compile()
    t_compile = time.perf_counter() - t0
    wall, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = compiled(state, ids, mask).block_until_ready()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all())
    cur, peak = rss_gib()
    print(
        f"L={args.length} B={args.batch} compute={args.dtype}: compile {t_compile:.1f} s; forward wall "
        f"{', '.join(f'{t:.1f}' for t in wall)} s, cpu {', '.join(f'{t:.1f}' for t in cpu)} s; "
        f"rss {cur:.2f} GiB, peak rss during compile+forward {peak:.2f} GiB"
    )


if __name__ == "__main__":
    main()
