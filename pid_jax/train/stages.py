"""What each stage trains, as NNX filters over the network's parameter paths.

teacher: the adapter (`lq_proj`, including its aux RGB head, and `pit_lq_gate`); the backbone is frozen,
         though gradients flow through it to the adapter's injections.
full:    every parameter except those upstream keeps out of the optimizer: the last patch block's
         text-output branch (`attn.proj_y`, `norm_y2`, `mlp_y`), whose output nothing consumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flax import nnx

from pid_jax.config import PidNetConfig
from pid_jax.errors import ConfigError


@dataclass(frozen=True)
class PathPrefix:
    """NNX filter: the variable's path starts with `prefix` (a tuple of attribute names / list indices)."""

    prefix: tuple[str | int, ...]

    def __call__(self, path: tuple, x: Any) -> bool:
        return tuple(path[: len(self.prefix)]) == self.prefix


def adapter_filter() -> nnx.filterlib.Filter:
    return nnx.All(nnx.Param, nnx.Any(PathPrefix(("lq_proj",)), PathPrefix(("pit_lq_gate",))))


def unused_text_branch_filter(cfg: PidNetConfig) -> nnx.filterlib.Filter:
    last = cfg.patch_depth - 1
    return nnx.Any(*(PathPrefix(("patch_blocks", last, *p)) for p in (("attn", "proj_y"), ("norm_y2",), ("mlp_y",))))


def trainable_filter(cfg: PidNetConfig, stage: str) -> nnx.filterlib.Filter:
    """The parameters `stage` trains (whatever the config's `train_lq_proj_only` says)."""
    if stage == "teacher":
        return adapter_filter()
    if stage == "full":
        return nnx.All(nnx.Param, nnx.Not(unused_text_branch_filter(cfg)))
    raise ConfigError(f"stage={stage!r} (expected 'teacher' or 'full')")
