"""Time the full-size Qwen-Image VAE (random weights): encode an image, decode its latent; optionally upstream too.

    python3 scripts/bench_vae_wan.py --size 1024x1024 --dtype bfloat16 [--repeats 3] [--torch-reference UPSTREAM]
        [--torch-only]

Prints one JSON line per (part, implementation): compile seconds, median seconds, peak device memory.
With --torch-reference, upstream's `WanVAE2d_` (pid/_src/tokenizers/qwenimage_vae.py of that checkout) runs the
same shapes in the same dtype as upstream's tokenizer does (weights cast, no autocast); its framework imports
are replaced by inert stand-ins so that only the network module is loaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np


def _peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _time(fn, x, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    fn(x).block_until_ready()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x).block_until_ready()
        runs.append(time.perf_counter() - t0)
    return first, statistics.median(runs)


def bench_jax(size: tuple[int, int], dtype: str, repeats: int, batch: int) -> list[dict]:
    import jax

    from pid_jax.vae import init_vae

    vae = init_vae("qwenimage", dtype=dtype)
    h, w = size
    x = np.random.default_rng(0).uniform(-1, 1, (batch, 3, h, w)).astype(np.float32)
    z = np.random.default_rng(1).standard_normal((batch, 16, h // 8, w // 8)).astype(np.float32)
    out = []
    for part, fn, arg in (("encode", vae.encode, x), ("decode", vae.decode, z)):
        first, med = _time(fn, arg, repeats)
        out.append(
            {
                "impl": "pid-jax",
                "part": part,
                "size": f"{h}x{w}",
                "batch": batch,
                "dtype": dtype,
                "first_call_s": round(first, 3),
                "median_s": round(med, 4),
                "peak_bytes": _peak_bytes(),
                "backend": jax.default_backend(),
            }
        )
    return out


def _load_upstream(ref: Path):
    """Upstream's qwenimage_vae module with its framework imports stubbed (only torch/einops are real)."""
    stub_names = [
        "pid",
        "pid._ext",
        "pid._ext.imaginaire",
        "pid._ext.imaginaire.lazy_config",
        "pid._ext.imaginaire.utils",
        "pid._ext.imaginaire.utils.distributed",
        "pid._src",
        "pid._src.tokenizers",
        "pid._src.tokenizers.interface",
    ]
    for n in stub_names:
        sys.modules.setdefault(n, types.ModuleType(n))
    lazy = sys.modules["pid._ext.imaginaire.lazy_config"]
    lazy.LazyCall = lambda f: lambda **kw: None
    lazy.LazyDict = dict
    sys.modules["pid._ext.imaginaire.utils"].log = types.SimpleNamespace(info=print)
    dist = sys.modules["pid._ext.imaginaire.utils.distributed"]
    dist.get_rank, dist.sync_model_states = (lambda: 0), (lambda m: None)
    sys.modules["pid._src.tokenizers.interface"].VideoTokenizerInterface = object
    path = ref / "pid" / "_src" / "tokenizers" / "qwenimage_vae.py"
    spec = importlib.util.spec_from_file_location("upstream_qwenimage_vae", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_torch(ref: Path, size: tuple[int, int], dtype: str, repeats: int, batch: int) -> list[dict]:
    import torch

    mod = _load_upstream(ref)
    cfg = json.loads((Path(__file__).resolve().parents[1] / "configs" / "vae_qwenimage.json").read_text())["network"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    net = mod.WanVAE2d_(**cfg).to(dev).eval().to(tdt)
    scale = [
        torch.tensor(mod._LATENTS_MEAN, dtype=tdt, device=dev),
        1.0 / torch.tensor(mod._LATENTS_STD, dtype=tdt, device=dev),
    ]
    h, w = size
    x = torch.rand(batch, 3, h, w, device=dev, dtype=tdt) * 2 - 1
    z = torch.randn(batch, 16, h // 8, w // 8, device=dev, dtype=tdt)
    out = []
    for part, fn, arg in (("encode", lambda a: net.encode(a, scale), x), ("decode", lambda a: net.decode(a, scale), z)):
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        runs = []
        with torch.no_grad():
            for _ in range(repeats + 1):
                if dev == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(arg)
                if dev == "cuda":
                    torch.cuda.synchronize()
                runs.append(time.perf_counter() - t0)
        out.append(
            {
                "impl": "upstream-torch",
                "part": part,
                "size": f"{h}x{w}",
                "batch": batch,
                "dtype": dtype,
                "first_call_s": round(runs[0], 3),
                "median_s": round(statistics.median(runs[1:]), 4),
                "peak_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
                "backend": dev,
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--torch-reference", type=Path, default=None, help="upstream PiD checkout")
    ap.add_argument("--torch-only", action="store_true", help="only upstream (a Python with torch, no JAX)")
    a = ap.parse_args()
    size = tuple(int(v) for v in a.size.lower().split("x"))
    rows = [] if a.torch_only else bench_jax(size, a.dtype, a.repeats, a.batch)
    if a.torch_reference:
        rows += bench_torch(a.torch_reference, size, a.dtype, a.repeats, a.batch)
    for r in rows:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
