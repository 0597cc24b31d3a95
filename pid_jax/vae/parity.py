"""VAE parity against a dump of upstream's tokenizer: `pid-jax parity --vae KIND --checkpoint FILE --io IO.npz`.

The dump (the fixtures' `io.npz` format) holds `in.image` [B,3,H,W] in [-1,1], `out.latent` = upstream
`encode(in.image)` (normalised), `in.latent`, `out.image` = upstream `decode(in.latent)`, and optionally
`act.moments` (the encoder output before the mean is taken). Rows: act.moments (when present), out.latent,
out.image; bounds as for one network forward (float32 1e-4, bfloat16 compute 3e-2 against a float32 dump).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pid_jax.errors import InputError
from pid_jax.parity import BOUNDS, Row, _load_npz, compare, report

REQUIRED = ["in.image", "out.latent", "in.latent", "out.image"]


def vae_parity(
    kind: str,
    checkpoint: str | os.PathLike,
    io_path: str | os.PathLike,
    config: Any = None,
    dtype: str = "float32",
) -> list[Row]:
    """Load `checkpoint` as a `kind` VAE (config None: the released full-size architecture) and compare."""
    from pid_jax.vae.api import load_vae

    data = _load_npz(io_path, REQUIRED)  # read first: a bad dump is refused before any loading
    vae = load_vae(kind, checkpoint, dtype, config)
    latent, moments = vae.encode_with_moments(data["in.image"])
    rows = [compare("act.moments", moments, data["act.moments"])] if "act.moments" in data else []
    rows.append(compare("out.latent", latent, data["out.latent"]))
    rows.append(compare("out.image", vae.decode(data["in.latent"]), data["out.image"]))
    return rows


def bound(dtype: str) -> float:
    return BOUNDS[("forward", dtype)]


def cli_parity(args: argparse.Namespace) -> int:
    """The `parity --vae` branch of the CLI: prints the report; exit 0 on PASS, 1 on FAIL."""
    others = [f"--{n.replace('_', '-')}" for n in ("sampler", "gemma", "torch_reference") if getattr(args, n, None)]
    if others:
        raise InputError(f"--vae compares a VAE against --io; it does not take {', '.join(others)}")
    if not args.checkpoint or not args.io:
        raise InputError("--vae needs --checkpoint FILE (the VAE weights under test) and --io IO.npz")
    config = Path(args.config) if args.config else None
    rows = vae_parity(args.vae, args.checkpoint, args.io, config, args.dtype)
    ok, text = report(rows, bound(args.dtype))
    print(text)
    return 0 if ok else 1
