"""DMD2 distillation settings: one frozen dataclass (hashable, a static jit argument) with upstream's defaults.

Defaults are upstream's stage C (`pid_training/experiment_pid_v1pt5_*/distillation.py` and
`PidDistillModelConfig`; training-map.md sections 2.3 and 3). Every setting has a `pid-jax train --stage
distill` flag. Schedules count as upstream does: the student's warm-up in student steps (`it // freq`), the GAN
weight's warm-up in raw iterations, the EMA index `it // freq`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pid_jax.config import STUDENT_T_LIST, PidNetConfig
from pid_jax.errors import ConfigError
from pid_jax.remat import normalise as normalise_remat
from pid_jax.train.config import TrainConfig

MODELS = ("net", "fake_score", "discriminator")
EXACT_DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class DistillConfig:
    """What one distillation iteration does. Master weights are float32; `dtype` is the compute dtype."""

    # AdamW per model (torch semantics; weight decay on every trained tensor). Upstream: student lr 1e-5 wd 0
    # (fused AdamW, LambdaLinear warm-up); fake_score lr 1e-5 wd 1e-3; discriminator lr 1e-5 wd 0; all eps 1e-8.
    student_lr: float = 1e-5
    student_weight_decay: float = 0.0
    student_eps: float = 1e-8
    fake_lr: float = 1e-5
    fake_weight_decay: float = 1e-3
    fake_eps: float = 1e-8
    disc_lr: float = 1e-5
    disc_weight_decay: float = 0.0
    disc_eps: float = 1e-8
    b1: float = 0.9
    b2: float = 0.999
    # The student's LambdaLinear warm-up, counted in student steps (upstream: 100, i.e. 600 iterations).
    warmup_steps: int = 100
    warmup_start: float = 1e-6
    clip_norm: float = 0.1  # net and fake_score, each on its own; the discriminator only gets nan_to_num
    ema_sigma_rel: float = 0.1  # power EMA of the student, index it // student_update_freq
    student_update_freq: int = 6  # it % freq == 0: student step; else fake_score + discriminator step
    # Teacher forcing: the student input is x0 noised to a t drawn uniformly from t_list[:-1].
    t_list: tuple[float, ...] = STUDENT_T_LIST
    # DMD time: t = clamp(sigmoid(N(t_mean, t_std)), t_min, t_max), no shift.
    t_mean: float = 0.0
    t_std: float = 1.0
    t_min: float = 0.02
    t_max: float = 0.99
    cfg_scale: float = 3.0  # the teacher's guidance against the negative prompt
    vsd_weight: float = 1.0
    dsm_weight: float = 1.0
    # GAN through the frozen teacher's early-exit patch features; weight w * min(1, it / warmup) on the raw it.
    gan_weight: float = 0.05
    gan_warmup: int = 100
    r1_weight: float = 200.0  # approximate R1: logits of real features vs of real + alpha * noise
    r1_alpha: float = 0.1
    feature_index: int | None = None  # the patch block the discriminator reads (None: patch_depth // 2, 7 of 14)
    # Conditioning draws as upstream's distillation (the teacher's, without LQ-latent dropout).
    apply_prob: float = 0.75
    sigma_min: float = 0.0
    sigma_max: float = 0.8
    noise_form: str = "flow"
    lq_drop_prob: float = 0.0
    caption_drop_prob: float = 0.1
    dtype: str = "float32"
    remat: str = "off"  # a `pid_jax.remat` plan for the student and fake score ("off", "full", "dots", ...)
    # Where upstream computes in float64 (v -> x0 conversions, the VSD weight, gradient and loss): "float64" does
    # the same in a scoped jax.enable_x64 (elementwise over images: cheap on CPU and GPU); "float32" for devices
    # without float64 (TPU).
    exact_dtype: str = "float64"

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"distill config: {msg}")

        object.__setattr__(self, "remat", normalise_remat(self.remat))

        for name in ("student_lr", "fake_lr", "disc_lr", "student_eps", "fake_eps", "disc_eps", "clip_norm"):
            if not getattr(self, name) > 0:
                raise bad(f"{name}={getattr(self, name)} (expected > 0)")
        for name in ("student_weight_decay", "fake_weight_decay", "disc_weight_decay", "vsd_weight", "dsm_weight"):
            if getattr(self, name) < 0:
                raise bad(f"{name}={getattr(self, name)} (expected >= 0)")
        for name in ("gan_weight", "r1_weight", "r1_alpha", "cfg_scale"):
            if getattr(self, name) < 0:
                raise bad(f"{name}={getattr(self, name)} (expected >= 0)")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise bad(f"betas ({self.b1}, {self.b2}) must lie in [0, 1)")
        if self.warmup_steps < 0 or self.gan_warmup < 0:
            raise bad("warmup_steps and gan_warmup must be >= 0")
        if self.student_update_freq < 2:
            raise bad(f"student_update_freq={self.student_update_freq} (expected >= 2: a student step, then fakes)")
        if len(self.t_list) < 2 or any(not 0 <= t <= 1 for t in self.t_list):
            raise bad(f"t_list={self.t_list} (expected >= 2 times in [0, 1])")
        if not 0 <= self.t_min <= self.t_max <= 1:
            raise bad(f"DMD time range [{self.t_min}, {self.t_max}] must lie in [0, 1]")
        if not self.t_std > 0:
            raise bad(f"t_std={self.t_std} (expected > 0)")
        for name in ("apply_prob", "lq_drop_prob", "caption_drop_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(f"{name}={getattr(self, name)} (expected a probability in [0, 1])")
        if not 0 <= self.sigma_min <= self.sigma_max <= 1:
            raise bad(f"sigma range [{self.sigma_min}, {self.sigma_max}] must lie in [0, 1]")
        if self.noise_form not in ("flow", "vp"):
            raise bad(f"noise_form={self.noise_form!r} (expected 'flow' or 'vp')")
        if self.dtype not in ("float32", "bfloat16"):
            raise bad(f"dtype={self.dtype!r} (expected float32 or bfloat16)")
        if self.exact_dtype not in EXACT_DTYPES:
            raise bad(f"exact_dtype={self.exact_dtype!r} (expected one of {EXACT_DTYPES})")
        if not self.ema_sigma_rel > 0:
            raise bad(f"ema_sigma_rel={self.ema_sigma_rel} (expected > 0)")
        if self.feature_index is not None and self.feature_index < 0:
            raise bad(f"feature_index={self.feature_index} (expected >= 0)")

    @classmethod
    def with_overrides(cls, **overrides: Any) -> DistillConfig:
        """Upstream's defaults with `overrides` (None values: not given)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"distill config: unknown setting(s) {unknown}")
        given = {k: (tuple(v) if k == "t_list" else v) for k, v in overrides.items() if v is not None}
        return cls(**given)

    def feature_indices(self, cfg: PidNetConfig) -> tuple[int, ...]:
        """The discriminator's patch block, as upstream's default: the middle one (7 of 14; 2 of 4)."""
        i = cfg.patch_depth // 2 if self.feature_index is None else self.feature_index
        if i >= cfg.patch_depth:
            raise ConfigError(f"distill config: feature_index={i} but the network has {cfg.patch_depth} patch blocks")
        return (i,)

    def is_student(self, it: int) -> bool:
        return it % self.student_update_freq == 0

    def student_steps_before(self, it: int) -> int:
        """Student steps taken before iteration `it`: the student scheduler's and the EMA's index."""
        return it // self.student_update_freq

    def gan_weight_at(self, it: int) -> float:
        """The generator GAN weight at raw iteration `it` (float64, as upstream's Python arithmetic)."""
        w = self.gan_weight
        if self.gan_warmup > 0 and it < self.gan_warmup:
            w = w * it / self.gan_warmup
        return w

    def optimizer_config(self, model: str) -> TrainConfig:
        """One model's AdamW and learning-rate schedule, as the shared optimizer code reads them."""
        if model == "net":
            lr, wd, eps, warm = self.student_lr, self.student_weight_decay, self.student_eps, self.warmup_steps
        elif model == "fake_score":
            lr, wd, eps, warm = self.fake_lr, self.fake_weight_decay, self.fake_eps, 0
        elif model == "discriminator":
            lr, wd, eps, warm = self.disc_lr, self.disc_weight_decay, self.disc_eps, 0
        else:
            raise ConfigError(f"distill config: model {model!r} (expected one of {MODELS})")
        return TrainConfig(
            stage="full",
            lr=lr,
            weight_decay=wd,
            eps=eps,
            b1=self.b1,
            b2=self.b2,
            warmup_steps=warm,
            warmup_start=self.warmup_start,
            clip_norm=self.clip_norm,
            ema_sigma_rel=self.ema_sigma_rel,
            dtype=self.dtype,
            remat=self.remat,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["t_list"] = list(self.t_list)
        return d
