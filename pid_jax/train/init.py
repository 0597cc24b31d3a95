"""Initialisation as upstream's, and loading an init checkpoint for training.

`init_like_upstream` follows upstream module by module: torch's defaults for every layer (Linear:
U(+-1/sqrt(fan_in)) weight and bias; norms 1 and 0; `y_pos_embedding` N(0, 1)), then PixelDiT's
`initialize_weights` (xavier-uniform `s_embedder`, N(0, 0.02) timestep MLP weights, zero `final_layer`),
then the adapter's `init_weights` (convs trunc-normal 0.02 with zero bias; output heads and PiT head zero
when `zero_init_lq`; aux head Linears trunc-normal 0.02) and the gates' own init (`content_proj`
trunc-normal 0.01 with bias 2, `log_alpha` = log 5). Values come from numpy on the host, deterministic
for a seed (not torch's generator).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flax import nnx

from pid_jax.config import PidNetConfig
from pid_jax.convert.pidnet import ConversionReport, _describe, path_to_key, select_network_keys
from pid_jax.convert.torch_checkpoint import load_state_dict
from pid_jax.errors import CheckpointError, ConfigError
from pid_jax.layers import Conv2d, GroupNorm, LayerNorm, Linear, RMSNorm
from pid_jax.lq_projection import SigmaAwareGate
from pid_jax.modeling import PidNet, assign_params
from pid_jax.train.stages import adapter_filter

Init = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]


def abstract_train_net(cfg: PidNetConfig, attn_impl: str = "auto") -> PidNet:
    """The network with the aux RGB head when the config has it: shapes only."""
    return nnx.eval_shape(lambda: PidNet(cfg, rngs=None, attn_impl=attn_impl, aux_head=True))


def _const(v: float) -> Init:
    return lambda rng, shape: np.full(shape, v, np.float32)


def _uniform(bound: float) -> Init:
    return lambda rng, shape: rng.uniform(-bound, bound, shape).astype(np.float32)


def _normal(std: float, trunc: float | None = None) -> Init:
    # torch trunc_normal_(std=s) truncates at +-2 (absolute), i.e. +-2/s standard deviations: resample there.
    def f(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        a = rng.standard_normal(shape) * std
        if trunc is not None:
            bad = np.abs(a) > trunc
            while bad.any():
                a[bad] = rng.standard_normal(int(bad.sum())) * std
                bad = np.abs(a) > trunc
        return a.astype(np.float32)

    return f


def _trunc(std: float) -> Init:
    return _normal(std, trunc=2.0)


def _rules(model: PidNet) -> dict[str, Init]:
    """Upstream key -> initialiser, in upstream's order (later rules override earlier ones)."""
    cfg = model.cfg
    rules: dict[str, Init] = {}
    # 1. torch defaults, by module type.
    for path, m in nnx.iter_graph(model):
        k = path_to_key(path)
        if isinstance(m, Linear):
            bound = m.weight.shape[1] ** -0.5
            rules[k + ".weight"] = _uniform(bound)
            if m.bias is not None:
                rules[k + ".bias"] = _uniform(bound)
        elif isinstance(m, Conv2d):
            bound = int(np.prod(m.weight.shape[1:])) ** -0.5
            rules[k + ".weight"], rules[k + ".bias"] = _uniform(bound), _uniform(bound)
        elif isinstance(m, (RMSNorm,)):
            rules[k + ".weight"] = _const(1.0)
        elif isinstance(m, (GroupNorm, LayerNorm)):
            rules[k + ".weight"], rules[k + ".bias"] = _const(1.0), _const(0.0)
    rules["y_pos_embedding"] = _normal(1.0)
    # 2. PixelDiT.initialize_weights.
    w = model.s_embedder.proj.weight.shape
    rules["s_embedder.proj.weight"] = _uniform(float(np.sqrt(6.0 / (w[0] + w[1]))))
    rules["s_embedder.proj.bias"] = _const(0.0)
    rules["t_embedder.mlp.0.weight"] = _normal(0.02)
    rules["t_embedder.mlp.2.weight"] = _normal(0.02)
    rules["final_layer.linear.weight"] = rules["final_layer.linear.bias"] = _const(0.0)
    # 3. LQProjection2D.init_weights, then the gates' constructors.
    for path, m in nnx.iter_graph(model.lq_proj):
        k = "lq_proj." + path_to_key(path) if path else "lq_proj"
        if isinstance(m, Conv2d):
            rules[k + ".weight"], rules[k + ".bias"] = _trunc(0.02), _const(0.0)
    heads = [f"lq_proj.output_heads.{i}" for i in range(cfg.num_lq_outputs)]
    heads += ["lq_proj.pit_head"] if cfg.pit_lq_inject else []
    for k in heads:
        rules[k + ".weight"] = _const(0.0) if cfg.zero_init_lq else _trunc(0.02)
        rules[k + ".bias"] = _const(0.0)
    if model.lq_proj.lq_aux_rgb_head is not None:
        for i in (1, 3):
            rules[f"lq_proj.lq_aux_rgb_head.{i}.weight"] = _trunc(0.02)
            rules[f"lq_proj.lq_aux_rgb_head.{i}.bias"] = _const(0.0)
    for path, m in nnx.iter_graph(model):
        if isinstance(m, SigmaAwareGate):
            k = path_to_key(path)
            rules[k + ".content_proj.weight"] = _trunc(0.01)
            rules[k + ".content_proj.bias"] = _const(2.0)
            rules[k + ".log_alpha"] = _const(float(np.log(5.0)))
    return rules


def init_like_upstream(cfg: PidNetConfig, seed: int = 0, attn_impl: str = "auto") -> PidNet:
    """A float32 network (with the aux head when the config has it) initialised as upstream's."""
    abstract = abstract_train_net(cfg, attn_impl)
    rules = _rules(abstract)
    rng = np.random.default_rng(seed)

    def value(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in rules:
            raise ConfigError(f"internal: no upstream initialiser for {key}")
        return rules[key](rng, shape)

    return assign_params(abstract, value)


def load_init(
    path: str | os.PathLike, cfg: PidNetConfig, stage: str, seed: int = 0, attn_impl: str = "auto"
) -> tuple[PidNet, list[str]]:
    """Load a `.pth`/`.safetensors` init checkpoint, or a converted directory (`pid-jax convert`,
    `train-export --out`), strictly into the training network.

    Every file key must exist in the network with the same shape, and every network key must be in the
    file, except for the teacher stage, where adapter keys (`lq_proj.*`, `pit_lq_gate.*`) may be missing
    (upstream starts its teacher from a backbone-only file): those keep upstream's init and are returned.
    """
    p = Path(path)
    if p.is_dir():
        from pid_jax.weights import load_converted

        _, net_sd = load_converted(p)  # manifest, shapes and checksums verified
        stray: list[str] = []
    elif p.is_file():
        net_sd, stray = select_network_keys(load_state_dict(p), ConversionReport())
    else:
        raise CheckpointError(f"{p}: no such init checkpoint (a .pth/.safetensors file or a converted directory)")
    model = init_like_upstream(cfg, seed, attn_impl)
    state = nnx.state(model, nnx.Param)
    want = {path_to_key(k): tuple(v.shape) for k, v in nnx.to_flat_state(state)}
    may_miss = (
        {path_to_key(k) for k, _ in nnx.to_flat_state(nnx.state(model, adapter_filter()))}
        if stage == "teacher"
        else set()
    )
    unexpected = list(stray) + [k for k in net_sd if k not in want]
    mismatched = [(k, tuple(v.shape), want[k]) for k, v in net_sd.items() if k in want and tuple(v.shape) != want[k]]
    absent = sorted(set(want) - set(net_sd))
    missing = [k for k in absent if k not in may_miss]
    if unexpected or mismatched or missing:
        raise CheckpointError(_describe(str(p), unexpected, mismatched, missing))
    initialised = [k for k in absent if k in may_miss]
    current = {path_to_key(k): v for k, v in nnx.to_flat_state(state)}

    def value(key: str, shape: tuple[int, ...]) -> np.ndarray:
        return net_sd[key] if key in net_sd else np.asarray(current[key][...])

    return assign_params(model, value), initialised
