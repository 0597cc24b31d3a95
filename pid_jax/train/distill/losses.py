"""DMD2's math as pure functions: teacher forcing, the DMD time, v -> x0, teacher CFG, VSD, DSM, GAN, R1.

Where upstream computes in float64 (`_net_output_to_x0`, `variational_score_distillation_loss`) these do too,
inside a scoped `jax.enable_x64` (`exact`): the float64 operations are elementwise over image-sized tensors,
so they cost a few image-sized temporaries and no measurable time next to the networks; with `exact_dtype`
"float32" (devices without float64) the same formulas run in float32.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp


def exact(dtype: str):
    """A context in which `dtype` ("float64" or "float32") arrays can be made (x64 only inside it)."""
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def _bcast(t: jax.Array, ndim: int) -> jax.Array:
    return t.reshape(-1, *([1] * (ndim - 1)))


def teacher_forcing_input(
    x0: jax.Array, noise: jax.Array, idx: jax.Array, t_list: tuple[float, ...]
) -> tuple[jax.Array, jax.Array]:
    """(x_in, t_s): t_s = t_list[idx] (idx uniform over t_list[:-1]), x_in = (1 - t_s) x0 + t_s noise, float32."""
    t_s = jnp.asarray(t_list, jnp.float32)[idx]
    return perturb(x0, noise, t_s), t_s


def sigmoid(x: jax.Array, dtype: str = "float64") -> jax.Array:
    """torch's float32 sigmoid, 1 / (1 + exp(-x)) with a correctly rounded exp (taken from float64) and each of
    the two other operations rounded to float32; XLA's own logistic differs by an ulp. jax.nn.sigmoid without
    float64."""
    if dtype != "float64":
        return jax.nn.sigmoid(x)
    with exact(dtype):
        e = jnp.exp(-x.astype(jnp.float64)).astype(jnp.float32)
    return 1.0 / (1.0 + e)


def dmd_time(
    normal: jax.Array, t_min: float, t_max: float, mean: float = 0.0, std: float = 1.0, dtype: str = "float64"
) -> jax.Array:
    """t = clamp(sigmoid(mean + std * N(0, 1)), t_min, t_max): upstream's logit-normal draw, without a shift."""
    x = normal.astype(jnp.float32)
    if (mean, std) != (0.0, 1.0):
        x = mean + std * x
    return jnp.clip(sigmoid(x, dtype), t_min, t_max)


def _zero(x: jax.Array) -> jax.Array:
    return x * 0.0  # not foldable under IEEE rules (inf, nan, -0)


def perturb(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x0 + t eps in float32 with each product rounded before the sum, as torch: XLA would contract a
    product feeding an add into one fused multiply-add; adding a zero it cannot fold keeps the rounding."""
    tb = _bcast(t.astype(jnp.float32), x0.ndim)
    a, b = x0.astype(jnp.float32), eps.astype(jnp.float32)
    z = _zero(a)
    return ((1.0 - tb) * a + z) + (tb * b + z)


def velocity_to_x0(x_t: jax.Array, v: jax.Array, t: jax.Array, dtype: str = "float64") -> jax.Array:
    """x0 = x_t - t v, computed in `dtype` and returned in x_t's dtype (float32), as `_net_output_to_x0`."""
    out = x_t.dtype
    with exact(dtype):
        d = jnp.dtype(dtype)
        x0 = x_t.astype(d) - _bcast(t.astype(d), x_t.ndim) * v.astype(d)
        return x0.astype(out)


def cfg_velocity(v_cond: jax.Array, v_uncond: jax.Array, scale: float) -> jax.Array:
    """v_uncond + scale (v_cond - v_uncond); the conditional velocity alone for scale 1."""
    if scale == 1.0:
        return v_cond
    vc, vu = v_cond.astype(jnp.float32), v_uncond.astype(jnp.float32)
    return vu + scale * (vc - vu)


def vsd_grad(x0_student: jax.Array, x0_teacher: jax.Array, x0_fake: jax.Array, dtype: str = "float64") -> jax.Array:
    """g = nan_to_num((x0_fake - x0_teacher) w), w = 1 / (mean_{C,H,W} |x0_student - x0_teacher| + 1e-6), in `dtype`
    (to be called inside `exact(dtype)`)."""
    d = jnp.dtype(dtype)
    s, te, fa = x0_student.astype(d), x0_teacher.astype(d), x0_fake.astype(d)
    axes = tuple(range(1, s.ndim))
    w = 1.0 / (jnp.mean(jnp.abs(s - te), axis=axes, keepdims=True) + 1e-6)
    return jnp.nan_to_num((fa - te) * w, nan=0.0, posinf=0.0, neginf=0.0)


def vsd_loss(x0_student: jax.Array, x0_teacher: jax.Array, x0_fake: jax.Array, dtype: str = "float64") -> jax.Array:
    """Upstream's VSD loss 0.5 mean((x0_s - sg(x0_s - g))^2), in `dtype` (float64 as upstream), returned as float32.

    Its gradient with respect to the student's x0 is g / N, computed in `dtype` and rounded to x0's dtype; no
    gradient reaches the teacher's or the fake score's x0."""
    with exact(dtype):
        d = jnp.dtype(dtype)
        x0_teacher, x0_fake = jax.lax.stop_gradient(x0_teacher), jax.lax.stop_gradient(x0_fake)
        g = jax.lax.stop_gradient(vsd_grad(x0_student, x0_teacher, x0_fake, dtype))
        s = x0_student.astype(d)
        target = jax.lax.stop_gradient(s - g)
        return (0.5 * jnp.mean(jnp.square(s - target))).astype(jnp.float32)


def dsm_loss(v_fake: jax.Array, x0_student: jax.Array, eps: jax.Array) -> jax.Array:
    """mean((v_fake - (eps - x0_student))^2) in float32: the fake score's flow-matching loss on the student's x0."""
    d = v_fake.astype(jnp.float32) - (eps.astype(jnp.float32) - x0_student.astype(jnp.float32))
    return jnp.mean(d * d)


def gan_generator_loss(fake_logits: jax.Array) -> jax.Array:
    """Non-saturating generator loss mean(softplus(-D(fake)))."""
    return jnp.mean(jax.nn.softplus(-fake_logits.astype(jnp.float32)))


def gan_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """mean(softplus(D(fake))) + mean(softplus(-D(real)))."""
    return jnp.mean(jax.nn.softplus(fake_logits.astype(jnp.float32))) + jnp.mean(
        jax.nn.softplus(-real_logits.astype(jnp.float32))
    )


def r1_loss(real_logits: jax.Array, real_alpha_logits: jax.Array) -> jax.Array:
    """Approximate R1: mean((D(real) - D(real + alpha noise))^2), differentiated through both logits."""
    d = real_logits.astype(jnp.float32) - real_alpha_logits.astype(jnp.float32)
    return jnp.mean(d * d)
