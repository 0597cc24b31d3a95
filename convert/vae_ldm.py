"""Released LDM-style VAE files (Flux.1 / SD3 / SDXL / Flux.2) -> the NNX AutoEncoder's state.

Two on-disk layouts, both accepted for every kind:
- LDM (upstream `AutoEncoder` / original Stability files): `encoder.down.<i>.block.<j>...`, `mid.attn_1.q`
  as a 1x1 conv [C, C, 1, 1]. This is our module's own naming: identity mapping.
- diffusers (`AutoencoderKL`): `down_blocks.<i>.resnets.<j>`, `up_blocks` numbered from the deepest level,
  `mid_block.attentions.0.to_q` as a Linear [C, C] (older files: `query`/`key`/`value`/`proj_attn`).
  Renamed by the table below (our own; same result as upstream's `_convert_diffusers_to_ldm`).

The kinds differ in keys, which is how a file of the wrong kind is refused: flux2 has
`encoder.quant_conv`, `decoder.post_quant_conv` and `bn.running_*`; sdxl has top-level `quant_conv` /
`post_quant_conv`; flux and sd3 have neither and share everything, so there the caller's kind decides.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from pid_jax.errors import CheckpointError
from pid_jax.vae.config import VAEConfig

# Keys in released files that inference knowingly does not use (checked to be what they claim).
SKIPPED = {"bn.num_batches_tracked": "BatchNorm update counter (training only)"}

# diffusers name -> LDM name, for path pieces below a block (applied after the block renames).
_DIFFUSERS_PIECES = (
    ("mid_block.resnets.0.", "mid.block_1."),
    ("mid_block.resnets.1.", "mid.block_2."),
    ("mid_block.attentions.0.group_norm.", "mid.attn_1.norm."),
    ("mid_block.attentions.0.to_q.", "mid.attn_1.q."),
    ("mid_block.attentions.0.to_k.", "mid.attn_1.k."),
    ("mid_block.attentions.0.to_v.", "mid.attn_1.v."),
    ("mid_block.attentions.0.to_out.0.", "mid.attn_1.proj_out."),
    # diffusers < 0.14 attention names
    ("mid_block.attentions.0.query.", "mid.attn_1.q."),
    ("mid_block.attentions.0.key.", "mid.attn_1.k."),
    ("mid_block.attentions.0.value.", "mid.attn_1.v."),
    ("mid_block.attentions.0.proj_attn.", "mid.attn_1.proj_out."),
    (".conv_shortcut.", ".nin_shortcut."),
    ("conv_norm_out.", "norm_out."),
)
_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.(resnets|downsamplers\.0)\.")
_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.")
_ATTN_PROJ = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def is_diffusers(keys) -> bool:
    return any("down_blocks." in k or "up_blocks." in k or "mid_block." in k for k in keys)


def diffusers_to_ldm_key(key: str, num_levels: int) -> str:
    """One diffusers `AutoencoderKL` key in LDM naming (`up_blocks.i` is level `num_levels - 1 - i`)."""
    m = _DOWN.match(key)
    if m:
        part = "block" if m.group(2) == "resnets" else "downsample"
        key = f"encoder.down.{m.group(1)}.{part}." + key[m.end() :]
    m = _UP.match(key)
    if m:
        part = "block" if m.group(2) == "resnets" else "upsample"
        key = f"decoder.up.{num_levels - 1 - int(m.group(1))}.{part}." + key[m.end() :]
    for a, b in _DIFFUSERS_PIECES:
        key = key.replace(a, b)
    return key


def ldm_to_diffusers_key(key: str, num_levels: int) -> str:
    """The inverse renaming (tests re-key fixtures with it; the 1x1 attention weights become Linear)."""
    m = re.match(r"^encoder\.down\.(\d+)\.(block|downsample)\.", key)
    if m:
        part = "resnets" if m.group(2) == "block" else "downsamplers.0"
        key = f"encoder.down_blocks.{m.group(1)}.{part}." + key[m.end() :]
    m = re.match(r"^decoder\.up\.(\d+)\.(block|upsample)\.", key)
    if m:
        part = "resnets" if m.group(2) == "block" else "upsamplers.0"
        key = f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.{part}." + key[m.end() :]
    for a, b in _DIFFUSERS_PIECES[:7] + _DIFFUSERS_PIECES[11:]:
        key = key.replace(b, a)
    return key


def _describe_file(keys: set[str], z: int | None) -> str:
    """What a file's keys say it is (for wrong-kind errors)."""
    zs = f", {z} latent channels" if z else ""
    if "bn.running_mean" in keys or "encoder.quant_conv.weight" in keys:
        return f"a Flux.2 VAE (encoder.quant_conv, bn.running_mean{zs})"
    if "quant_conv.weight" in keys:
        return f"an SD/SDXL-style VAE (top-level quant_conv/post_quant_conv{zs})"
    return f"a Flux.1/SD3-style VAE (no quant_conv{zs})"


_EXPECT = {
    "flux": "a Flux.1 VAE (no quant_conv, no BatchNorm statistics)",
    "sd3": "an SD3 VAE (no quant_conv, no BatchNorm statistics)",
    "sdxl": "an SDXL VAE (top-level quant_conv/post_quant_conv)",
    "flux2": "a Flux.2 VAE (encoder.quant_conv, decoder.post_quant_conv, bn.running_mean/var)",
}


def _family(keys: set[str]) -> str:
    if "bn.running_mean" in keys or "encoder.quant_conv.weight" in keys:
        return "flux2"
    if "quant_conv.weight" in keys:
        return "sdxl"
    return "flux"


def map_state_dict(sd: Mapping[str, np.ndarray], cfg: VAEConfig, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """{file key: array} in LDM or diffusers layout -> {module key: array}; refuses files of another kind.

    Coverage and shapes are checked afterwards against the module (pid_jax.vae.api.map_vae_file).
    """
    if cfg.kind not in _EXPECT:
        raise CheckpointError(f"internal: vae_ldm does not handle kind {cfg.kind!r}")
    if "encoder.conv_in.weight" not in sd or "decoder.conv_in.weight" not in sd:
        sample = ", ".join(sorted(sd)[:4])
        raise CheckpointError(
            f"{source}: not an LDM-style autoencoder file (no encoder.conv_in / decoder.conv_in; keys start "
            f"{sample or 'none'}); expected {_EXPECT[cfg.kind]}"
        )
    levels = len(cfg.network["ch_mult"])
    diffusers = is_diffusers(sd)
    out: dict[str, np.ndarray] = {}
    for k, v in sd.items():
        if k in SKIPPED:
            if tuple(np.shape(v)) != ():
                raise CheckpointError(f"{source}: {k} has shape {tuple(np.shape(v))}, expected a scalar")
            continue
        key = diffusers_to_ldm_key(k, levels) if diffusers else k
        if key in out:
            raise CheckpointError(f"{source}: {k} maps onto {key}, which another key already provides")
        if diffusers and _ATTN_PROJ.match(key) and v.ndim == 2:
            v = v[:, :, None, None]  # diffusers Linear -> 1x1 conv
        out[key] = v
    keys = set(out)
    if _family(keys) != ("flux" if cfg.kind == "sd3" else cfg.kind):
        z = out["decoder.conv_in.weight"].shape[1] if out["decoder.conv_in.weight"].ndim == 4 else None
        raise CheckpointError(f"{source}: this is {_describe_file(keys, z)}, expected {_EXPECT[cfg.kind]}")
    return out


def file_shapes_to_arrays(shapes: Mapping[str, list[int]], dtype=np.float32) -> dict[str, np.ndarray]:
    """Zero-memory stand-ins for a manifest's {key: shape} (coverage checks without the weights)."""
    return {k: np.broadcast_to(np.zeros((), dtype), tuple(s)) for k, s in shapes.items()}
