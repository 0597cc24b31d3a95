"""Offline Hub resolution and the conversion cache, end to end on the v1_flux fixture weights.

A directory laid out like the Hugging Face hub cache (refs/main -> commit, snapshots/<commit>/<file> a
relative symlink to blobs/<sha256>) holds the fixture checkpoint under a custom preset's Hub location.

Offline mode: huggingface_hub reads HF_HUB_OFFLINE once, when `huggingface_hub.constants` is imported
(`constants.HF_HUB_OFFLINE`, consulted through `constants.is_offline_mode()`). Setting the environment
variable in a running process therefore changes nothing: hf_hub_download still sends its HEAD request
(checked: it opens a socket). The `offline` fixture sets the variable (for anything imported or spawned
later) *and* patches `huggingface_hub.constants.HF_HUB_OFFLINE = True`, and blocks sockets so that any
network use fails the test instead of silently falling back to the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import pidnet_files
from flax import nnx
from pid_jax.convert.pidnet import state_dict_of

from pid_jax import hub, weights
from pid_jax.config import HubSpec, Preset, load_config
from pid_jax.decoder import PiDDecoder
from pid_jax.errors import CheckpointError, PidError

# Each config's abstract shape evaluation (seconds) is done once per module; see conftest.
pytestmark = pytest.mark.usefixtures("memoized_shape_evaluation")
REPO = "nvidia/PiD"
FILENAME = "checkpoints/PiD_fixture_v1_flux/model_ema_bf16.pth"
COMMIT = "4f5c0d9e8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e"


@dataclasses.dataclass
class HubCache:
    root: Path  # the cache_dir passed to huggingface_hub
    snapshot_file: Path  # what hf_hub_download returns
    blob: Path
    preset: Preset


def _block_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")


def _offline(mp: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mp.setattr(socket.socket, "connect", _block_network)
    mp.setattr(socket, "create_connection", _block_network)
    mp.setattr(socket, "getaddrinfo", _block_network)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch)


def build_hub_cache(root: Path, ckpt: Path) -> tuple[Path, Path]:
    """Lay out `root` like the Hub cache with `ckpt` as REPO/FILENAME at COMMIT; returns (snapshot file, blob)."""
    repo = root / ("models--" + REPO.replace("/", "--"))
    data = ckpt.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT / FILENAME
    snap.parent.mkdir(parents=True)
    snap.symlink_to(os.path.relpath(blob, snap.parent))  # relative, as huggingface_hub writes it
    return snap, blob


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> HubCache:
    pth, cfg, _ = pidnet_files("v1_flux")
    root = tmp_path_factory.mktemp("hf") / "hub"
    snap, blob = build_hub_cache(root, pth)
    preset = dataclasses.replace(
        load_config(cfg), name="v1_flux_fixture", variant="2k", backbones=("flux",), hub=HubSpec(REPO, FILENAME)
    )
    return HubCache(root, snap, blob, preset)


@pytest.fixture(scope="module")
def fresh(cache: HubCache) -> dict[str, np.ndarray]:
    """Reference parameters: the fixture checkpoint loaded directly (no Hub, no cache)."""
    _, model = weights.load_model(pidnet_files("v1_flux")[0], pidnet_files("v1_flux")[1], "float32")
    return state_dict_of(model)


@pytest.fixture
def hub_preset(cache: HubCache, monkeypatch: pytest.MonkeyPatch) -> Preset:
    def resolve(backbone: str, variant: str = "2k") -> Preset:
        assert (backbone, variant) == ("flux", "2k")
        return cache.preset

    monkeypatch.setattr(hub, "resolve_preset", resolve)
    return cache.preset


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Counts real conversions (reads of the .pth through the converter)."""
    calls: list[Path] = []
    original = weights.read_checkpoint

    def spy(path, preset):
        calls.append(Path(path))
        return original(path, preset)

    monkeypatch.setattr(weights, "read_checkpoint", spy)
    return calls


def cache_entry(c: HubCache) -> Path:
    return weights.cache_dir_for(c.snapshot_file.absolute(), c.preset)


def from_pretrained(c: HubCache) -> PiDDecoder:
    return PiDDecoder.from_pretrained("flux", "2k", cache_dir=c.root, dtype="float32")


def params_of(dec: PiDDecoder) -> dict[str, np.ndarray]:
    return state_dict_of(nnx.merge(dec.graphdef, dec.params))


def assert_same_params(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


_FWD: dict = {}


def output(dec: PiDDecoder) -> np.ndarray:
    """One network forward on the fixture inputs; one compiled program for every decoder here."""
    if "f" not in _FWD:
        graphdef = dec.graphdef
        _FWD["f"] = jax.jit(lambda params, *a: nnx.merge(graphdef, params)(*a))
    with np.load(pidnet_files("v1_flux")[2]) as d:
        args = [jnp.asarray(d[k]) for k in ("in.x", "in.t", "in.y", "in.lq_latent", "in.degrade_sigma")]
    return np.asarray(_FWD["f"](dec.params, *args))


@pytest.fixture(scope="module")
def first(cache: HubCache) -> Iterator[tuple[PiDDecoder, list[Path]]]:
    """The first from_pretrained: offline, converts once, writes the cache entry."""
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        mp.setattr(hub, "resolve_preset", lambda b, v="2k": cache.preset)
        calls: list[Path] = []
        original = weights.read_checkpoint
        mp.setattr(weights, "read_checkpoint", lambda p, pr: calls.append(Path(p)) or original(p, pr))
        assert not cache_entry(cache).exists()
        dec = from_pretrained(cache)
    yield dec, calls


# --- resolution ---------------------------------------------------------------------------------------


def test_download_offline_returns_cached_file(cache: HubCache, offline) -> None:
    got = hub.download(cache.preset, cache_dir=cache.root)
    assert got == cache.snapshot_file
    assert got.is_symlink() and got.resolve() == cache.blob.resolve()
    assert got.read_bytes() == pidnet_files("v1_flux")[0].read_bytes()


def test_download_offline_missing_file_is_one_clear_error(cache: HubCache, offline) -> None:
    other = dataclasses.replace(cache.preset, hub=HubSpec(REPO, "checkpoints/not_there/model_ema_bf16.pth"))
    with pytest.raises(PidError, match=r"nvidia/PiD/checkpoints/not_there/model_ema_bf16\.pth is not in the local"):
        hub.download(other, cache_dir=cache.root)


def test_offline_guard_is_effective(cache: HubCache, offline) -> None:
    """Control: with the guard on, any real network attempt fails loudly (so 'no network' above is proven)."""
    with pytest.raises(AssertionError, match="network access attempted"):
        socket.create_connection(("huggingface.co", 443))


def test_preset_without_hub_location(cache: HubCache) -> None:
    with pytest.raises(PidError, match="names no Hub location"):
        hub.download(dataclasses.replace(cache.preset, hub=None), cache_dir=cache.root)


# --- conversion cache ---------------------------------------------------------------------------------


def test_first_call_converts_beside_checkpoint(cache: HubCache, first, fresh) -> None:
    dec, calls = first
    assert calls == [cache.snapshot_file.absolute()]
    entry = cache_entry(cache)
    assert entry.parent == cache.snapshot_file.parent  # beside the checkpoint, inside the snapshot
    assert entry.name == f"model_ema_bf16.pth.pid-jax-v{weights.FORMAT_VERSION}-v1_flux_fixture"
    assert {p.name for p in entry.iterdir()} == {"config.json", "params", "manifest.json"}
    assert dec.preset is cache.preset and dec.dtype == jnp.float32
    assert_same_params(params_of(dec), fresh)


def test_second_call_reuses_cache(cache: HubCache, first, fresh, offline, hub_preset, monkeypatch) -> None:
    def no_conversion(*a, **k):
        raise AssertionError("converted again although the cache is valid")

    monkeypatch.setattr(weights, "read_checkpoint", no_conversion)
    monkeypatch.setattr(weights, "write_converted", no_conversion)
    dec = from_pretrained(cache)
    assert_same_params(params_of(dec), fresh)
    np.testing.assert_array_equal(output(dec), output(first[0]))


def _largest_params_file(entry: Path) -> Path:
    files = [p for p in (entry / "params").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _flip(path: Path, frac: float = 0.5, n: int = 8) -> None:
    b = bytearray(path.read_bytes())
    i = int(len(b) * frac)
    b[i : i + n] = bytes(x ^ 0xA5 for x in b[i : i + n])
    path.write_bytes(bytes(b))


def _expect_rebuild(cache: HubCache, conversions: list[Path], fresh, first) -> None:
    dec = from_pretrained(cache)
    assert conversions == [cache.snapshot_file.absolute()], "a damaged cache must be rebuilt from the checkpoint"
    assert_same_params(params_of(dec), fresh)
    np.testing.assert_array_equal(output(dec), output(first[0]))
    weights.load_converted(cache_entry(cache))  # the rebuilt entry is complete and verifies


def test_flipped_bytes_detected_and_rebuilt(cache, first, fresh, offline, hub_preset, conversions) -> None:
    entry = cache_entry(cache)
    weights.load_converted(entry)  # valid before
    _flip(_largest_params_file(entry))
    with pytest.raises(CheckpointError, match=r"fail their checksum"):
        weights.load_converted(entry)
    with pytest.raises(CheckpointError):
        weights.load_model(entry)
    _expect_rebuild(cache, conversions, fresh, first)


# Orbax's restore of a truncated file fails inside its asyncio machinery, which later reports "Event loop is
# closed" from a callback (orbax internals, after pid-jax has already turned the failure into CheckpointError).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_params_rebuilt(cache, first, fresh, offline, hub_preset, conversions) -> None:
    entry = cache_entry(cache)
    big = _largest_params_file(entry)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        weights.load_converted(entry)
    _expect_rebuild(cache, conversions, fresh, first)


def test_incomplete_entry_rebuilt(cache, first, fresh, offline, hub_preset, conversions) -> None:
    """An entry without manifest.json (an interrupted conversion) is never read."""
    entry = cache_entry(cache)
    (entry / "manifest.json").unlink()
    _expect_rebuild(cache, conversions, fresh, first)


def test_stale_entry_rebuilt_when_checkpoint_changes(cache, first, fresh, offline, hub_preset, conversions) -> None:
    entry = cache_entry(cache)
    weights.load_converted(entry)
    st = cache.blob.stat()
    os.utime(cache.blob, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a re-download
    _expect_rebuild(cache, conversions, fresh, first)
