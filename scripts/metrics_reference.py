#!/usr/bin/env python3
"""Reference LPIPS and NIQE values for tests/test_metrics.py, from the reference implementations themselves.

    /work/torchenv/bin/python scripts/metrics_reference.py --lpips-wheel DIR --basicsr-src DIR [--site SITE-PACKAGES]

- LPIPS: the official `lpips` 0.1.4 package's own code (`lpips.LPIPS(net="alex", version="0.1")`, its
  `weights/v0.1/alex.pth` linear heads) run in PyTorch, from the unpacked wheel in DIR. Its AlexNet comes from
  torchvision, which cannot download weights here: a stand-in `torchvision.models.alexnet` builds torchvision's
  layer layout and loads the AlexNet tensors of pid_jax/assets/lpips_alex.safetensors (OIHW from HWIO), so
  the check covers the whole computation and the linear heads independently.
- NIQE: BasicSR 1.4.2's `calculate_niqe` (basicsr/metrics/niqe.py with its own niqe_pris_params.npz and
  torch `imresize`), from the unpacked sdist in DIR (only the four modules it needs are loaded).
Inputs are rebuilt in the test from the shipped held-out images with `inputs()` below (numpy only).
Prints JSON; the numbers are pasted into the test with this provenance.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def inputs() -> dict[str, np.ndarray]:
    """Deterministic test images (uint8 RGB): two held-out crops and distortions of them."""
    from PIL import Image

    imgs = {}
    for name in ("kodim03", "monarch"):
        a = np.asarray(Image.open(ROOT / "pid_jax" / "assets" / "images" / f"{name}.png").convert("RGB"))
        imgs[name] = a
        rng = np.random.default_rng(0)
        imgs[f"{name}_noise"] = np.clip(np.rint(a + 12.0 * rng.standard_normal(a.shape)), 0, 255).astype(np.uint8)
        imgs[f"{name}_shift"] = np.roll(a, (2, 3), axis=(0, 1))
        small = Image.fromarray(a).resize((a.shape[1] // 4, a.shape[0] // 4), Image.BICUBIC)
        imgs[f"{name}_bicubic"] = np.asarray(small.resize((a.shape[1], a.shape[0]), Image.BICUBIC))
    return imgs


PAIRS = [
    ("kodim03", "kodim03_noise"),
    ("kodim03", "kodim03_shift"),
    ("kodim03", "kodim03_bicubic"),
    ("monarch", "monarch_noise"),
    ("monarch", "monarch_bicubic"),
    ("kodim03_noise", "kodim03"),
]
NIQE_IMAGES = ["kodim03", "kodim03_noise", "kodim03_bicubic", "monarch", "monarch_bicubic"]


def _module(name: str, path: Path | None = None, **attrs) -> types.ModuleType:
    if path is None:
        m = types.ModuleType(name)
    else:
        spec = importlib.util.spec_from_file_location(name, path)
        m = importlib.util.module_from_spec(spec)
        sys.modules[name] = m
        spec.loader.exec_module(m)
    for k, v in attrs.items():
        setattr(m, k, v)
    sys.modules[name] = m
    return m


def lpips_reference(wheel: Path, imgs: dict[str, np.ndarray]) -> dict[str, float]:
    import torch
    from safetensors.numpy import load_file

    t = load_file(str(ROOT / "pid_jax" / "assets" / "lpips_alex.safetensors"))

    def alexnet(pretrained=False, **_):
        n = torch.nn
        feats = n.Sequential(
            n.Conv2d(3, 64, 11, 4, 2), n.ReLU(True), n.MaxPool2d(3, 2),
            n.Conv2d(64, 192, 5, padding=2), n.ReLU(True), n.MaxPool2d(3, 2),
            n.Conv2d(192, 384, 3, padding=1), n.ReLU(True),
            n.Conv2d(384, 256, 3, padding=1), n.ReLU(True),
            n.Conv2d(256, 256, 3, padding=1), n.ReLU(True), n.MaxPool2d(3, 2),
        )  # fmt: skip
        for i, idx in enumerate((0, 3, 6, 8, 10)):
            feats[idx].weight.data = torch.from_numpy(t[f"conv{i}.kernel"].transpose(3, 2, 0, 1).copy())
            feats[idx].bias.data = torch.from_numpy(t[f"conv{i}.bias"].copy())
        return types.SimpleNamespace(features=feats)

    tv = _module("torchvision")
    tv.models = _module("torchvision.models", alexnet=alexnet)
    sys.path.insert(0, str(wheel))
    import lpips

    model = lpips.LPIPS(net="alex", version="0.1", verbose=False).eval()
    for i in range(5):  # the package's own heads must equal the shipped ones
        ref = getattr(model, f"lin{i}").model[-1].weight.detach().numpy().reshape(-1)
        assert np.abs(ref - t[f"lin{i}.kernel"]).max() == 0.0, i

    def tens(a):
        return torch.from_numpy(a.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]

    out = {}
    with torch.no_grad():
        for a, b in PAIRS:
            out[f"{a}|{b}"] = float(model(tens(imgs[a]), tens(imgs[b])).item())
    return out


def niqe_reference(src: Path, imgs: dict[str, np.ndarray]) -> dict[str, float]:
    b = src / "basicsr"
    _module("basicsr")
    color = _module("basicsr.utils.color_util", b / "utils" / "color_util.py")
    reg = types.SimpleNamespace(register=lambda *a, **k: lambda f: f)
    _module("basicsr.utils", bgr2ycbcr=color.bgr2ycbcr)
    _module("basicsr.utils.registry", METRIC_REGISTRY=reg)
    _module("basicsr.utils.matlab_functions", b / "utils" / "matlab_functions.py")
    _module("basicsr.metrics")
    _module("basicsr.metrics.metric_util", b / "metrics" / "metric_util.py")
    _module("cv2")
    niqe = _module("basicsr.metrics.niqe", b / "metrics" / "niqe.py")
    # BasicSR reads BGR (its images come from cv2.imread).
    return {n: float(niqe.calculate_niqe(imgs[n][..., ::-1], crop_border=0)) for n in NIQE_IMAGES}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lpips-wheel", type=Path, required=True, help="the unpacked lpips-0.1.4 wheel")
    p.add_argument("--basicsr-src", type=Path, required=True, help="the unpacked basicsr-1.4.2 sdist")
    p.add_argument("--site", help="a site-packages with Pillow and scipy (the same numpy as torch's)")
    a = p.parse_args()
    if a.site:
        sys.path.append(a.site)  # after torch's own: only what the torch environment lacks comes from there
    imgs = inputs()
    res = {"lpips": lpips_reference(a.lpips_wheel, imgs)}
    res["niqe"] = niqe_reference(a.basicsr_src, imgs)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
