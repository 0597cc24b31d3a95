"""Released PiD state dict -> PidNet NNX state. Strict: every key used or knowingly skipped, every shape checked.

The NNX modules keep upstream names and torch layouts, so the mapping is the table below plus an
identity on the remaining dotted path (`patch_blocks.3.attn.qkv_x.weight` -> ('patch_blocks', 3, 'attn',
'qkv_x', 'weight')).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pid_jax.config import PidNetConfig
from pid_jax.errors import CheckpointError
from pid_jax.modeling import PidNet, abstract_pidnet, assign_params

# Prefix handling, in upstream's order of preference: the trained network lives under `net.`; other
# members of a training checkpoint (EMA copy, distillation critics) are not part of the decoder.
NETWORK_PREFIX = "net."
DROPPED_PREFIXES = ("net_ema.", "fake_score.", "discriminator.", "repa_loss.", "teacher.")
# Keys present in released files that inference knowingly does not use.
SKIPPED = {
    r"^lq_proj\.lq_aux_rgb_head\.": "training-only aux RGB head (reconstructs the LQ image; unused at inference)",
}


@dataclass
class ConversionReport:
    used: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"mapped {self.used} tensors"]
        out += [f"dropped {n} keys under '{p}' (not part of the decoder)" for p, n in self.dropped.items()]
        out += [f"skipped {n} keys: {why}" for why, n in self.skipped.items()]
        return out


def key_to_path(key: str) -> tuple[str | int, ...]:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def path_to_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def aux_head_shapes(cfg: PidNetConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the training-only aux head (LayerNorm, Linear, SiLU, Linear), checked though unused."""
    if not cfg.lq_aux_rgb_head:
        return {}
    h, pf = cfg.lq_hidden_dim, cfg.patch_size // cfg.sr_scale
    p = "lq_proj.lq_aux_rgb_head."
    return {
        p + "0.weight": (h,),
        p + "0.bias": (h,),
        p + "1.weight": (h, h),
        p + "1.bias": (h,),
        p + "3.weight": (3 * pf * pf, h),
        p + "3.bias": (3 * pf * pf,),
    }


@functools.lru_cache(maxsize=32)
def _network_shapes(cfg: PidNetConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    state = nnx.state(abstract_pidnet(cfg), nnx.Param)
    return tuple((path_to_key(p), tuple(v.shape)) for p, v in nnx.to_flat_state(state))


def expected_shapes(cfg: PidNetConfig, include_skipped: bool = True) -> dict[str, tuple[int, ...]]:
    """Upstream state-dict keys (without `net.`) and shapes for this config, by shape evaluation only."""
    out = dict(_network_shapes(cfg))
    if include_skipped:
        out.update(aux_head_shapes(cfg))
    return out


def select_network_keys(
    sd: Mapping[str, np.ndarray], report: ConversionReport
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Strip `net.`, drop other training members; a bare state dict (no `net.` keys) is taken as is.

    Returns the network entries and, for a `net.`-prefixed file, its bare keys: those are unexpected,
    and must never replace the `net.` entry of the same name.
    """
    has_prefix = any(k.startswith(NETWORK_PREFIX) for k in sd)
    out: dict[str, np.ndarray] = {}
    stray: list[str] = []
    for k, v in sd.items():
        dropped = next((p for p in DROPPED_PREFIXES if k.startswith(p)), None)
        if dropped:
            report.dropped[dropped] = report.dropped.get(dropped, 0) + 1
        elif has_prefix and k.startswith(NETWORK_PREFIX):
            out[k[len(NETWORK_PREFIX) :]] = v
        elif has_prefix:
            stray.append(k)
        else:
            out[k] = v
    return out, stray


def map_state_dict(
    sd: Mapping[str, np.ndarray], cfg: PidNetConfig, source: str = "checkpoint"
) -> tuple[dict[str, np.ndarray], ConversionReport]:
    """Check and map a raw state dict; returns {upstream key: array} covering every network parameter."""
    report = ConversionReport()
    net_sd, stray = select_network_keys(sd, report)
    want = expected_shapes(cfg, include_skipped=False)
    skipped_want = aux_head_shapes(cfg)
    unexpected, mismatched, mapped = list(stray), [], {}
    for k, v in net_sd.items():
        why = next((w for pat, w in SKIPPED.items() if re.match(pat, k)), None)
        if why is not None and k in skipped_want:
            if tuple(v.shape) != skipped_want[k]:
                mismatched.append((k, tuple(v.shape), skipped_want[k]))
            report.skipped[why] = report.skipped.get(why, 0) + 1
            continue
        if k not in want:
            unexpected.append(k)
        elif tuple(v.shape) != want[k]:
            mismatched.append((k, tuple(v.shape), want[k]))
        else:
            mapped[k] = v
    missing = sorted((set(want) | set(skipped_want)) - set(net_sd))
    if unexpected or mismatched or missing:
        raise CheckpointError(_describe(source, unexpected, mismatched, missing))
    report.used = len(mapped)
    return mapped, report


def _describe(source: str, unexpected: list, mismatched: list, missing: list, show: int = 6) -> str:
    parts = []
    if mismatched:
        s = ", ".join(f"{k}: file {tuple(a)} vs network {tuple(b)}" for k, a, b in mismatched[:show])
        parts.append(f"{len(mismatched)} shape mismatch(es) [{s}{', ...' if len(mismatched) > show else ''}]")
    if missing:
        parts.append(
            f"{len(missing)} missing key(s) [{', '.join(missing[:show])}{', ...' if len(missing) > show else ''}]"
        )
    if unexpected:
        u = sorted(unexpected)
        parts.append(f"{len(u)} unexpected key(s) [{', '.join(u[:show])}{', ...' if len(u) > show else ''}]")
    hint = " (is this checkpoint for another preset?)" if mismatched or (missing and unexpected) else ""
    return f"{source}: does not match the network config: " + "; ".join(parts) + hint


def load_into(model: PidNet, mapped: Mapping[str, np.ndarray], dtype=jnp.float32) -> PidNet:
    """Write mapped arrays into an (abstract or concrete) model; returns the concrete model.

    Values go through float32 first: the files are bf16 and upstream promotes them into a float32
    network before any autocast.
    """

    def value(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in mapped:
            raise CheckpointError(f"internal: no value for {key}")
        return mapped[key]

    return assign_params(model, value, dtype)


def state_dict_of(model: PidNet) -> dict[str, np.ndarray]:
    """The model's parameters as an upstream-named state dict (float32 numpy)."""
    state = nnx.state(model, nnx.Param)
    return {path_to_key(p): np.asarray(v[...], dtype=np.float32) for p, v in nnx.to_flat_state(state)}
