"""Training hyper-parameters: one frozen dataclass (hashable, so jit can take it as a static argument).

Defaults are upstream's PiD teacher recipe (`pid_training/experiment_pid_v1pt5_*/teacher.py`);
`TrainConfig.for_stage` gives each stage's upstream values, any of which can be overridden.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pid_jax.errors import ConfigError
from pid_jax.remat import normalise as normalise_remat

STAGES = ("teacher", "full")
NOISE_FORMS = ("flow", "vp")
DTYPES = ("float32", "bfloat16")

# Upstream's optimizer settings per stage (training-map.md section 3): teacher = stage B; full = the
# full-network flow-matching fine-tune (stage A's settings on the PiD network).
_STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "teacher": dict(lr=5e-5, weight_decay=1e-3, eps=1e-8, warmup_steps=2000),
    "full": dict(lr=1e-5, weight_decay=0.0, eps=1e-8, warmup_steps=2000),
}


@dataclass(frozen=True)
class TrainConfig:
    """What one training step does. Master weights are always float32; `dtype` is the compute dtype."""

    stage: str = "teacher"  # "teacher": adapter only (lq_proj.*, pit_lq_gate.*); "full": every parameter
    # AdamW (torch semantics: decoupled weight decay on every trained tensor, bias correction).
    lr: float = 5e-5
    weight_decay: float = 1e-3
    eps: float = 1e-8
    b1: float = 0.9
    b2: float = 0.999
    # LambdaLinear warm-up: lr * (warmup_start + (1 - warmup_start) * n / warmup_steps), then constant.
    warmup_steps: int = 2000
    warmup_start: float = 1e-6
    # After the warm-up, upstream's LambdaLinear falls linearly from f_max = 1 to `lr_f_min` at step
    # `lr_cycle_steps` (None: upstream's recipes, f_min = f_max, a constant rate); held at f_min after it.
    lr_f_min: float = 1.0
    lr_cycle_steps: int | None = None
    clip_norm: float = 0.1
    aux_weight: float | None = None  # None: 0.8 for the teacher when the net has the aux RGB head, else 0
    ema_sigma_rel: float = 0.1
    dtype: str = "float32"
    # Latent noising of the LQ condition (per sample: apply ~ Bernoulli(apply_prob), sigma ~ U[min, max]).
    apply_prob: float = 0.75
    sigma_min: float = 0.0
    sigma_max: float = 0.8
    noise_form: str = "flow"  # "flow": (1-s) z + s eps;  "vp": sqrt(1-s^2) z + s eps (SDXL)
    lq_drop_prob: float = 0.1  # LQ-latent dropout (the whole latent zeroed)
    caption_drop_prob: float = 0.1  # applied by the data pipeline (`drop_captions`)
    # Rematerialisation plan (`pid_jax.remat`): "off", "full", "dots" or per-block entries such as
    # "patch=dots,pixel=full"; True/False (older run.json files) read as "full"/"off".
    remat: str = "off"
    # Flow-matching t: logit-normal u, then t = s u / (1 + (s - 1) u). shift None: dynamic from the image size,
    # s = base_shift * sqrt(sqrt(H W) / shift_base_size), as upstream's teacher.
    shift: float | None = None
    base_shift: float = 6.0
    shift_base_size: float = 2048.0
    t_mean: float = 0.0
    t_std: float = 1.0

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"train config: {msg}")

        if self.stage not in STAGES:
            raise bad(f"stage={self.stage!r} (expected one of {STAGES})")
        if self.noise_form not in NOISE_FORMS:
            raise bad(f"noise_form={self.noise_form!r} (expected one of {NOISE_FORMS})")
        try:
            object.__setattr__(self, "remat", normalise_remat(self.remat))
        except ConfigError as e:
            raise bad(str(e)) from None
        if self.dtype not in DTYPES:
            raise bad(f"dtype={self.dtype!r} (expected one of {DTYPES})")
        if not self.lr > 0:
            raise bad(f"lr={self.lr} (expected > 0)")
        if self.weight_decay < 0 or self.eps <= 0 or self.clip_norm <= 0:
            raise bad("weight_decay must be >= 0, eps and clip_norm > 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise bad(f"betas ({self.b1}, {self.b2}) must lie in [0, 1)")
        if self.warmup_steps < 0:
            raise bad(f"warmup_steps={self.warmup_steps} (expected >= 0)")
        if not 0 <= self.lr_f_min <= 1:
            raise bad(f"lr_f_min={self.lr_f_min} (expected a factor in [0, 1])")
        if self.lr_cycle_steps is not None and self.lr_cycle_steps <= self.warmup_steps:
            raise bad(f"lr_cycle_steps={self.lr_cycle_steps} must exceed warmup_steps={self.warmup_steps}")
        for name in ("apply_prob", "lq_drop_prob", "caption_drop_prob"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise bad(f"{name}={v} (expected a probability in [0, 1])")
        if not 0 <= self.sigma_min <= self.sigma_max <= 1:
            raise bad(f"sigma range [{self.sigma_min}, {self.sigma_max}] must lie in [0, 1]")
        if self.aux_weight is not None and self.aux_weight < 0:
            raise bad(f"aux_weight={self.aux_weight} (expected >= 0)")
        if self.shift is not None and not self.shift > 0:
            raise bad(f"shift={self.shift} (expected > 0)")
        if not self.ema_sigma_rel > 0:
            raise bad(f"ema_sigma_rel={self.ema_sigma_rel} (expected > 0)")

    @classmethod
    def for_stage(cls, stage: str, **overrides: Any) -> TrainConfig:
        """Upstream's defaults for `stage`, with `overrides` (None values are ignored: "not given")."""
        if stage not in STAGES:
            raise ConfigError(f"train config: stage={stage!r} (expected one of {STAGES})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"train config: unknown setting(s) {unknown}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**_STAGE_DEFAULTS[stage], "stage": stage, **given})

    def resolved_aux_weight(self, has_aux_head: bool) -> float:
        """The aux RGB loss weight for a network with or without the head."""
        if self.aux_weight is None:
            return 0.8 if (self.stage == "teacher" and has_aux_head) else 0.0
        if self.aux_weight > 0 and not has_aux_head:
            raise ConfigError(
                f"train config: aux_weight={self.aux_weight} but the network has no aux RGB head (lq_aux_rgb_head)"
            )
        return float(self.aux_weight)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
