"""The public VAE object: load a released (or fixture) VAE file strictly and run encode / decode.

Each kind registers a `VAEKind` in `KINDS`: a module builder and a state-dict mapper. Every module
follows one protocol, channels-first at the boundary (the layout upstream and PiD use):

- `module.encode_moments(images [B,3,H,W]) -> [B,2*z,h,w]`: the encoder output before taking the mean
  (what the fixtures record as `act.moments`: after `quant_conv` for sdxl and flux2, after `conv1` for
  qwenimage);
- `module.encode(images) -> [B,C,h',w']`: the normalised posterior mean, as upstream's tokenizer `encode`;
- `module.decode(latent) -> [B,3,H,W]`: inverse normalisation, then the decoder (no clamp: upstream's range).

Parameters are stored in the compute dtype; GroupNorm/BatchNorm statistics are always float32.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pid_jax.convert import vae_wan
from pid_jax.errors import CheckpointError, ConfigError, InputError
from pid_jax.vae import wan
from pid_jax.vae.config import VAE_KINDS, VAEConfig, load_vae_preset


class VAEKind(NamedTuple):
    """How to build one kind's NNX module and map its files.

    build(config, rngs, dtype) -> nnx.Module  (rngs=None: shape-only placeholders, for eval_shape)
    map_state_dict(file_sd, config, source) -> {module key: array}
        file_sd is the raw file ({key: ndarray}); the result is keyed by the module's dotted state path
        (`encoder.down.0.block.0.conv1.weight`) with the module's shapes. It refuses a file of another kind
        or layout with a CheckpointError naming `source` and what was expected; the generic loader then
        checks coverage and shapes one-to-one.
    """

    build: Callable[..., nnx.Module]
    map_state_dict: Callable[[Mapping[str, np.ndarray], VAEConfig, str], dict[str, np.ndarray]]


def _ldm_kinds() -> dict[str, VAEKind]:
    from pid_jax.convert import vae_ldm
    from pid_jax.vae import autoencoder

    return {k: VAEKind(autoencoder.build, vae_ldm.map_state_dict) for k in ("flux", "sd3", "sdxl", "flux2")}


KINDS: dict[str, VAEKind] = _ldm_kinds()
KINDS["qwenimage"] = VAEKind(wan.build, vae_wan.map_state_dict)  # the Wan-2.1 VAE (2D)


def resolve_dtype(dtype: str | Any) -> Any:
    from pid_jax.weights import resolve_dtype as _resolve

    return _resolve(dtype)


def _kind_spec(kind: str) -> VAEKind:
    if kind not in KINDS:
        have = ", ".join(sorted(KINDS)) or "none"
        raise ConfigError(f"VAE kind {kind!r} is not available; kinds: {have} (all kinds: {', '.join(VAE_KINDS)})")
    return KINDS[kind]


def resolve_config(kind: str, config: VAEConfig | str | os.PathLike | dict | None) -> VAEConfig:
    """None: the released full-size architecture; otherwise a VAEConfig, a JSON path or a dict of the same kind."""
    if config is None:
        cfg = load_vae_preset(kind)
    elif isinstance(config, VAEConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = VAEConfig.from_dict(config)
    else:
        cfg = VAEConfig.from_json(config)
    if cfg.kind != kind:
        where = f"{config}: " if isinstance(config, str | os.PathLike) else ""
        raise ConfigError(f"{where}VAE config is for kind {cfg.kind!r}, but kind {kind!r} was asked for")
    return cfg


def abstract_module(cfg: VAEConfig) -> nnx.Module:
    """The module with shape-only parameters (no memory): for coverage checks and loading."""
    spec = _kind_spec(cfg.kind)
    return nnx.eval_shape(lambda: spec.build(cfg, None, jnp.float32))


def module_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """{module key: shape} of every parameter and statistic the module holds."""
    _, state = nnx.split(abstract_module(cfg))
    return {".".join(str(p) for p in path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def _check_mapped(mapped: Mapping[str, np.ndarray], want: Mapping[str, tuple[int, ...]], source: str) -> None:
    missing = sorted(set(want) - set(mapped))
    unexpected = sorted(set(mapped) - set(want))
    mismatched = [(k, tuple(v.shape), want[k]) for k, v in mapped.items() if k in want and tuple(v.shape) != want[k]]
    if not (missing or unexpected or mismatched):
        return
    parts, show = [], 6
    if mismatched:
        s = ", ".join(f"{k}: file {a} vs network {b}" for k, a, b in mismatched[:show])
        parts.append(f"{len(mismatched)} shape mismatch(es) [{s}{', ...' if len(mismatched) > show else ''}]")
    for what, ks in (("missing", missing), ("unexpected", unexpected)):
        if ks:
            parts.append(f"{len(ks)} {what} key(s) [{', '.join(ks[:show])}{', ...' if len(ks) > show else ''}]")
    raise CheckpointError(f"{source}: does not match the VAE config: " + "; ".join(parts))


def _assign(module: nnx.Module, value: Callable[[str, tuple[int, ...]], np.ndarray], dtype) -> nnx.Module:
    """A concrete module whose entry at key k is value(k, shape); Params in `dtype`, statistics in float32."""
    graphdef, state = nnx.split(module)
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        key = ".".join(str(p) for p in path)
        target = np.dtype(dtype) if isinstance(var, nnx.Param) else np.dtype(np.float32)
        a = np.asarray(value(key, tuple(var.shape)))
        if a.dtype != target:  # f16/bf16 -> float32 is exact; other casts go through float32
            a = a.astype(np.float32).astype(target)
        var.set_value(jnp.asarray(a))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


class VAE:
    """A loaded VAE: `encode(images)` -> normalised latent, `decode(latent)` -> images, jit-compiled per shape.

    Inputs are channels-first numpy or JAX arrays; outputs are float32 JAX arrays. Images are in [-1, 1].
    """

    def __init__(self, module: nnx.Module, config: VAEConfig, dtype: Any = jnp.float32):
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.module = module
        self._graphdef, self._state = nnx.split(module)
        self._fns: dict[str, Callable] = {}

    @property
    def state(self) -> nnx.State:
        return self._state

    def _fn(self, name: str) -> Callable:
        if name not in self._fns:
            graphdef, dtype = self._graphdef, self.dtype

            def run(state, x):
                m = nnx.merge(graphdef, state)
                x = x.astype(dtype)
                if name == "encode_with_moments":
                    return m.encode(x).astype(jnp.float32), m.encode_moments(x).astype(jnp.float32)
                return getattr(m, name)(x).astype(jnp.float32)

            self._fns[name] = jax.jit(run)
        return self._fns[name]

    def _check(self, x, what: str, channels: int, multiple: int) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[1] != channels:
            raise InputError(f"{what}: expected [B, {channels}, H, W], got shape {list(x.shape)}")
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise InputError(f"{what}: height and width must be multiples of {multiple}, got {list(x.shape[2:])}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise InputError(f"{what}: expected floating point values, got {x.dtype}")
        return x

    def encode(self, images) -> jax.Array:
        """[B,3,H,W] in [-1,1] -> normalised latent [B, latent_channels, H/down, W/down]."""
        x = self._check(images, "images", 3, self.config.down_factor)
        return self._fn("encode")(self._state, x)

    def encode_moments(self, images) -> jax.Array:
        """The encoder's moments before the mean is taken (fixture `act.moments`)."""
        x = self._check(images, "images", 3, self.config.down_factor)
        return self._fn("encode_moments")(self._state, x)

    def encode_with_moments(self, images) -> tuple[jax.Array, jax.Array]:
        """(latent, moments) from one compiled program (the encoder runs once: XLA merges the two paths)."""
        x = self._check(images, "images", 3, self.config.down_factor)
        return self._fn("encode_with_moments")(self._state, x)

    def decode(self, latent) -> jax.Array:
        """Normalised latent [B,C,h,w] -> images [B,3,h*down,w*down] (upstream's range, no clamp)."""
        z = self._check(latent, "latent", self.config.latent_channels, 1)
        return self._fn("decode")(self._state, z)


def read_vae_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A VAE weights file (.safetensors or torch zip .pth), read without executing anything."""
    from pid_jax.convert.torch_checkpoint import load_state_dict

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such VAE file")
    return load_state_dict(p)


def map_vae_file(
    kind: str, sd: Mapping[str, np.ndarray], cfg: VAEConfig, source: str = "checkpoint"
) -> dict[str, np.ndarray]:
    """Strictly map a raw state dict onto the module of `cfg`: every key used, every shape checked."""
    mapped = _kind_spec(kind).map_state_dict(sd, cfg, source)
    _check_mapped(mapped, module_shapes(cfg), source)
    return mapped


def load_vae(
    kind: str,
    checkpoint: str | os.PathLike,
    dtype: str | Any = "float32",
    config: VAEConfig | str | os.PathLike | dict | None = None,
) -> VAE:
    """Load a VAE file of `kind` (strict; refuses a file of another kind, naming file and expectation).

    config=None uses the released full-size architecture (configs/vae_<kind>.json).
    """
    cfg = resolve_config(kind, config)
    dt = resolve_dtype(dtype)
    mapped = map_vae_file(kind, read_vae_file(checkpoint), cfg, source=str(checkpoint))
    module = _assign(abstract_module(cfg), lambda k, s: mapped[k], dt)
    return VAE(module, cfg, dt)


def init_vae(
    kind: str, config: VAEConfig | str | os.PathLike | dict | None = None, seed: int = 0, dtype: str | Any = "float32"
) -> VAE:
    """A VAE with random weights (tests, offline demos, benchmarks), deterministic for a seed."""
    cfg = resolve_config(kind, config)
    dt = resolve_dtype(dtype)
    rng = np.random.default_rng(seed)

    def value(key: str, shape: tuple[int, ...]) -> np.ndarray:
        n = rng.standard_normal(shape, dtype=np.float32)
        if key.endswith("running_var"):
            return 0.5 + np.abs(n)
        if key.endswith("running_mean"):
            return 0.1 * n
        if len(shape) >= 2:
            return n * np.float32(np.prod(shape[1:]) ** -0.5)
        if key.endswith("weight") or key.endswith("gamma"):  # norm scales
            return 1.0 + 0.05 * n
        return 0.02 * n

    return VAE(_assign(abstract_module(cfg), value, dt), cfg, dt)
