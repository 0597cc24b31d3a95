"""Loading the distillation networks: the teacher (and a student of another origin) from a checkpoint file.

As upstream's `_load_teacher_checkpoint`: the EMA weights when the file has them (`net_ema.*`), else `net.*`
(or a bare state dict); the stage-B aux RGB head a released teacher carries is ignored (stage C builds every
network without it); everything else strict, every shape checked.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pid_jax.convert.pidnet import load_into, map_state_dict
from pid_jax.convert.torch_checkpoint import load_state_dict

from pid_jax.config import PidNetConfig
from pid_jax.errors import CheckpointError
from pid_jax.modeling import PidNet, abstract_pidnet

AUX_HEAD = "lq_proj.lq_aux_rgb_head."
EMA_PREFIX = "net_ema."


def distill_network_config(cfg: PidNetConfig) -> PidNetConfig:
    """The network of all three stage-C PidNets: the preset's, with the aux RGB head off (upstream forces it)."""
    return dataclasses.replace(cfg, lq_aux_rgb_head=False)


def load_distill_network(
    path: str | os.PathLike, cfg: PidNetConfig, attn_impl: str = "auto"
) -> tuple[PidNet, list[str]]:
    """A float32 PidNet (aux head off) from `path`, and the keys ignored (the aux head's), as upstream loads its
    teacher. A file with `net_ema.*` keys gives its EMA weights."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    sd = load_state_dict(p)
    if any(k.startswith(EMA_PREFIX) for k in sd):
        sd = {"net." + k[len(EMA_PREFIX) :]: v for k, v in sd.items() if k.startswith(EMA_PREFIX)}
    prefixed = any(k.startswith("net.") for k in sd)
    aux = AUX_HEAD if not prefixed else "net." + AUX_HEAD
    ignored = sorted(k for k in sd if k.startswith(aux))
    sd = {k: v for k, v in sd.items() if not k.startswith(aux)}
    cfg = distill_network_config(cfg)
    mapped, _ = map_state_dict(sd, cfg, source=str(p))
    return load_into(abstract_pidnet(cfg, attn_impl), mapped), ignored
