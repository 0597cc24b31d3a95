"""Training data: a directory of images (+ caption embeddings or captions, + optional latents) as a grain pipeline.

Layout of a dataset directory (flat; files are matched by stem):

  <stem>.png | <stem>.jpg | <stem>.jpeg   the high-resolution image, read as every verb reads images
                      (`pid_jax.images`: 16-bit to 8 bits, EXIF orientation, transparent images refused)
  <stem>.npy          optional: its caption embedding [L, D] (or [1, L, D]), D = the network's txt_embed_dim
  <stem>.txt          optional: its caption, encoded once with the JAX Gemma-2 (`--gemma DIR`); an error without
  <stem>.latent.npy   optional: the clean normalised LQ latent [C, H/s, W/s] of the WHOLE image (s = the
                      network's pixel scale). Then the image must be exactly the training size: a crop would
                      no longer match its latent. All images have one or none.

The null caption (dropped captions, 10% as upstream, and images with neither .npy nor .txt): `--null-caption
FILE` (an embedding), else Gemma's encoding of upstream's empty caption when `--gemma` is given, else zeros
-- allowed only for networks without the Gemma caption stream (txt_embed_dim != 2304, e.g. configs/demo.json);
a Gemma-conditioned network needs a real null caption.

Every random choice of a sample (epoch order, crop offset, caption dropout) is a function of (seed, global sample
index), so a batch is the same whatever the number of processes, devices or grain workers, and resuming from a
saved position replays exactly. Process p of P reads only its slice of each global batch.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from pid_jax.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GEMMA_DIM = 2304  # Gemma-2-2b hidden size: networks with this caption width are Gemma-conditioned
CAPTION_DROP_PROB = 0.1  # upstream CaptionStringDrop

# image batch [B, 3, h, w] in [-1, 1] (the LQ image) -> normalised latent [B, C, h', w']; may be a jitted JAX fn.
LatentEncoder = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class Record:
    image: str
    caption: str | None = None  # .npy embedding (given, or Gemma's encoding cached in the run directory)
    text: str | None = None  # .txt caption not yet encoded
    latent: str | None = None


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a sample must look like: training size, caption shape, latent shape (None: computed in the loop)."""

    height: int
    width: int
    caption_shape: tuple[int, int]
    latent_shape: tuple[int, int, int] | None = None
    alpha: str = "refuse"  # transparent images: refused, or composited over "white" / "black" (pid_jax.images)


def scan(root: str | os.PathLike) -> list[Record]:
    """The dataset's records, sorted by file name. One-line errors for a missing or empty directory."""
    d = Path(root)
    if not d.is_dir():
        raise InputError(f"--data {d}: no such directory")
    files = {p.name: p for p in d.iterdir() if p.is_file()}
    images = sorted(p for p in files.values() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(f"--data {d}: no images (*.png, *.jpg) in the directory")
    stems = [p.stem for p in images]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise InputError(f"--data {d}: several images share the stem {dup[0]!r} (captions are matched by stem)")
    out = []
    for p in images:
        emb, txt, lat = d / f"{p.stem}.npy", d / f"{p.stem}.txt", d / f"{p.stem}.latent.npy"
        out.append(
            Record(
                image=str(p),
                caption=str(emb) if emb.is_file() else None,
                text=str(txt) if txt.is_file() and not emb.is_file() else None,
                latent=str(lat) if lat.is_file() else None,
            )
        )
    return out


def _npy_shape(path: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise InputError(f"{path}: unreadable .npy ({type(e).__name__}: {str(e)[:120]})") from None
    return tuple(a.shape), a.dtype


def caption_length(records: Sequence[Record], default: int) -> int:
    """L of the first readable caption embedding (the null caption's length must match), else `default`."""
    for r in records:
        if r.caption is not None:
            try:
                return _npy_shape(r.caption)[0][-2]
            except (InputError, IndexError):
                continue  # a damaged one is reported with the others by `check`
    return default


def _check_record(r: Record, spec: DataSpec) -> None:
    h, w = spec.height, spec.width
    ih, iw = _decoded(r.image, spec.alpha).shape[:2]  # decoded whole, as training reads it (upright, RGB)
    if r.latent is not None:
        if (ih, iw) != (h, w):
            raise InputError(
                f"{r.image}: {ih}x{iw}, but with a precomputed .latent.npy the image must be exactly the "
                f"training size {h}x{w} (a crop would not match its latent)"
            )
        shape, _ = _npy_shape(r.latent)
        if spec.latent_shape is not None and shape != spec.latent_shape:
            raise InputError(f"{r.latent}: latent shape {shape}, expected {spec.latent_shape} for {h}x{w}")
    if r.caption is not None:
        shape, _ = _npy_shape(r.caption)
        if shape[:1] == (1,) and len(shape) == 3:
            shape = shape[1:]
        if shape != spec.caption_shape:
            raise InputError(
                f"{r.caption}: caption embedding shape {shape}, expected {spec.caption_shape} "
                "([L, D]: D the network's txt_embed_dim, L that of the null caption)"
            )


def _problem(r: Record, spec: DataSpec) -> str | None:
    try:
        _check_record(r, spec)
    except InputError as e:
        return str(e)
    except Exception as e:  # anything else a damaged file raises while being read
        return f"{r.image}: unreadable ({type(e).__name__}: {str(e)[:120]})"
    return None


def check(
    records: Sequence[Record], spec: DataSpec, skip_bad: bool = False
) -> tuple[list[Record], list[tuple[str, str]]]:
    """Validate every record against `spec` before anything is written or compiled: every image is decoded
    whole (a truncated file is found here, not mid-run), embeddings' and latents' shapes, image sizes.

    Returns (the records to train on, [(image, reason)] of those left out). Every bad record is reported at
    once: an InputError listing them all, or with `skip_bad` they are left out (an error if none is left)."""
    if not records:
        raise InputError("the dataset has no images")
    with_latent = sum(r.latent is not None for r in records)
    if with_latent not in (0, len(records)):
        missing = next(r.image for r in records if r.latent is None)
        raise InputError(f"{with_latent} of {len(records)} images have a .latent.npy but {missing} has none")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes without the GIL
        problems = list(pool.map(lambda r: _problem(r, spec), records))
    bad = [(r.image, p) for r, p in zip(records, problems, strict=True) if p is not None]
    kept = [r for r, p in zip(records, problems, strict=True) if p is None]
    if bad and not skip_bad:
        raise InputError(
            f"{len(bad)} of {len(records)} training images are bad (fix or remove them, or pass --skip-bad to train "
            f"without them): " + "; ".join(p for _, p in bad)
        )
    if not kept:
        raise InputError(f"all {len(records)} training images are bad: " + "; ".join(p for _, p in bad))
    return kept, bad


def null_caption(
    txt_embed_dim: int,
    length: int,
    path: str | os.PathLike | None = None,
    encode: Callable[[list[str]], np.ndarray] | None = None,
) -> np.ndarray:
    """The null caption [L, D]: a file, else the encoder's empty caption, else zeros (non-Gemma networks only)."""
    if path is not None:
        shape, _ = _npy_shape(str(path))
        a = np.asarray(np.load(path, allow_pickle=False), np.float32)
        a = a[0] if a.ndim == 3 and a.shape[0] == 1 else a
        if a.ndim != 2 or a.shape[1] != txt_embed_dim:
            raise InputError(f"--null-caption {path}: shape {shape}, expected [L, {txt_embed_dim}]")
        return a
    if encode is not None:
        return np.asarray(encode([""])[0], np.float32)  # upstream drops a caption to "" (CHI prompt + "")
    if txt_embed_dim == GEMMA_DIM:
        raise InputError(
            "this network is conditioned on Gemma-2 captions: give --null-caption FILE (an embedding of the empty "
            "caption) or --gemma DIR to encode it"
        )
    return np.zeros((length, txt_embed_dim), np.float32)


def encode_texts(
    records: Sequence[Record], encode: Callable[[list[str]], np.ndarray] | None, cache_dir: str | os.PathLike
) -> list[Record]:
    """Encode the .txt captions once (batches of 8) into `cache_dir/<stem>.npy`; records then point there."""
    todo = [r for r in records if r.text is not None]
    if not todo:
        return list(records)
    if encode is None:
        raise InputError(f"{todo[0].text}: a text caption needs --gemma DIR to encode it (or give <stem>.npy)")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    done: dict[str, str] = {}
    for i in range(0, len(todo), 8):
        chunk = todo[i : i + 8]
        texts = [Path(r.text).read_text(encoding="utf-8").strip() for r in chunk]
        emb = np.asarray(encode(texts), np.float32)
        for r, e in zip(chunk, emb, strict=True):
            dest = cache / f"{Path(r.image).stem}.npy"
            tmp = dest.with_name(dest.name + ".tmp.npy")
            np.save(tmp, e)
            os.replace(tmp, dest)
            done[r.image] = str(dest)
    return [dataclasses.replace(r, caption=done[r.image], text=None) if r.image in done else r for r in records]


# --- per-sample loading (runs in grain workers: numpy and PIL only) ----------------------------------


# Decoded images kept per process (uint8, at most this many bytes): a crop-per-sample loop over a few large
# photographs (the demo's 3000x2000 stereo pair) otherwise spends more time decoding PNGs than training.
IMAGE_CACHE_BYTES = 512 * 2**20
_decoded_cache: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
_cache_lock = threading.Lock()


def _decoded(path: str, alpha: str = "refuse") -> np.ndarray:
    """uint8 RGB [H, W, 3], read-only; cached by (path, size, mtime), least recently used evicted first.

    Read as every verb reads images (`pid_jax.images.read_image`): 16-bit PNGs keep their high byte, the EXIF
    orientation is applied, an opaque alpha channel is dropped and a transparent one refused, a truncated
    file is an error."""
    from pid_jax.images import read_image

    try:
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, alpha)
    except OSError as e:
        raise InputError(f"image {path}: unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    with _cache_lock:
        hit = _decoded_cache.get(key)
        if hit is not None:
            _decoded_cache.move_to_end(key)
            return hit
    a = read_image(path, alpha).pixels
    a.setflags(write=False)
    if a.nbytes <= IMAGE_CACHE_BYTES:
        with _cache_lock:
            _decoded_cache[key] = a
            while sum(v.nbytes for v in _decoded_cache.values()) > IMAGE_CACHE_BYTES:
                _decoded_cache.popitem(last=False)
    return a


def _signed(a: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1] (explicit: upstream's guess from the value range is not used)."""
    return (a.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def load_image(path: str, alpha: str = "refuse") -> np.ndarray:
    """RGB float32 [3, H, W] in [-1, 1]."""
    return _signed(_decoded(path, alpha))


def _cover(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Scale up (Lanczos, aspect kept) a uint8 [H, W, 3] image smaller than the crop so that it covers h x w."""
    from PIL import Image

    ih, iw, _ = img.shape
    if ih >= h and iw >= w:
        return img
    s = max(h / ih, w / iw)
    nh, nw = max(h, round(ih * s)), max(w, round(iw * s))
    return np.asarray(Image.fromarray(img).resize((nw, nh), Image.LANCZOS), np.uint8)


@dataclasses.dataclass(frozen=True)
class SampleLoader:
    """(global index, record index) -> one training sample; picklable for grain's worker processes."""

    records: tuple[Record, ...]
    spec: DataSpec
    null: np.ndarray
    seed: int
    caption_drop_prob: float = CAPTION_DROP_PROB

    def __call__(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
        g, ri = item
        r = self.records[ri]
        rng = np.random.default_rng([self.seed, 1, g])  # the crop and the caption drop of global sample g
        img = _decoded(r.image, self.spec.alpha)
        h, w = self.spec.height, self.spec.width
        out: dict[str, np.ndarray] = {}
        if r.latent is not None:
            if img.shape[:2] != (h, w):
                raise InputError(f"{r.image}: {img.shape[0]}x{img.shape[1]}, expected {h}x{w} (precomputed latent)")
            out["z"] = np.asarray(np.load(r.latent, allow_pickle=False), np.float32)
        else:
            img = _cover(img, h, w)
            top = int(rng.integers(0, img.shape[0] - h + 1))
            left = int(rng.integers(0, img.shape[1] - w + 1))
            img = img[top : top + h, left : left + w]
        out["x0"] = np.ascontiguousarray(_signed(img), np.float32)
        drop = rng.random() < self.caption_drop_prob
        if r.caption is None or drop:
            y = self.null
        else:
            y = np.asarray(np.load(r.caption, allow_pickle=False), np.float32)
            y = y[0] if y.ndim == 3 else y
            if y.shape != self.spec.caption_shape:
                raise InputError(f"{r.caption}: caption embedding shape {y.shape}, expected {self.spec.caption_shape}")
        out["y"] = np.asarray(y, np.float32)
        out["index"] = np.asarray(g, np.int64)
        return out


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 0, epoch]).permutation(n)


def global_sample(seed: int, n_records: int, g: int) -> int:
    """Record index of global sample g: a fresh permutation of the records every epoch."""
    epoch, pos = divmod(g, n_records)
    return int(_epoch_order(seed, epoch, n_records)[pos])


class GlobalIndices(grain.MapDataset):
    """Local sample k of process p -> (global sample g, record index): local batch i holds global samples
    i*B + p*B/P ... i*B + (p+1)*B/P - 1 (B the global batch, P processes). Infinite: epochs follow one another."""

    def __init__(self, seed: int, n_records: int, global_batch: int, process_index: int, process_count: int):
        super().__init__()
        if global_batch % process_count:
            raise InputError(f"batch {global_batch} is not divisible by the number of processes ({process_count})")
        self._seed, self._n, self._b = seed, n_records, global_batch
        self._p, self._local = process_index, global_batch // process_count

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        i, j = divmod(int(k), self._local)
        g = i * self._b + self._p * self._local + j
        return g, global_sample(self._seed, self._n, g)


def make_dataset(loader: SampleLoader, global_batch: int, process_index: int = 0, process_count: int = 1):
    """The grain MapDataset of this process's batches (dicts of stacked arrays: x0, y, index[, z])."""
    indices = GlobalIndices(loader.seed, len(loader.records), global_batch, process_index, process_count)
    return indices.map(loader).batch(global_batch // process_count)


class BatchIterator:
    """This process's batches, resumable: `state()` after a batch is what `start(state)` resumes from.

    The position is the number of batches consumed; resuming slices the (index-deterministic) grain dataset
    there, so a run may resume with another number of worker processes than it was saved with.
    """

    def __init__(self, dataset, workers: int = 0):
        self._dataset = dataset
        self._workers = workers
        self._it = None
        self._consumed = 0

    def start(self, state: dict[str, Any] | None = None) -> BatchIterator:
        self._consumed = int(state["batches"]) if state else 0
        ds = self._dataset[self._consumed :] if self._consumed else self._dataset
        ds = ds.to_iter_dataset()
        if self._workers > 0:
            _absl_flags_parsed()
            # Batches come back through the workers' queues (pickled), not shared memory: when a worker fails,
            # grain leaves the shared-memory blocks of batches already made behind in /dev/shm.
            no_shm = grain.experimental.DatasetOptions(min_shm_size=2**62)
            ds = grain.experimental.WithOptionsIterDataset(ds, no_shm)
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
        self._it = iter(ds)
        return self

    def state(self) -> dict[str, Any]:
        return {"batches": self._consumed}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._it)
        except InputError:
            raise
        except Exception as e:  # a worker's failure comes back wrapped; keep our one-line message
            msg = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            ours = [ln for ln in msg if "unreadable" in ln or "expected" in ln]
            raise InputError((ours or msg or [f"data loading failed ({type(e).__name__})"])[-1].strip()) from None
        self._consumed += 1
        return {k: np.array(v) for k, v in batch.items()}  # copy out of grain's shared memory

    def close(self) -> None:
        it, self._it = self._it, None
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags, which a non-absl program never parses."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
