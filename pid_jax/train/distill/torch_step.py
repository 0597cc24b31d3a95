"""Timing upstream's DMD2 iterations in PyTorch, for `pid-jax bench --train --stage distill --torch-reference`.

Driver side (no torch): `time_distill_reference(...)` runs this file by path in a python with torch (as
`train.torch_step` does). Worker side: upstream's own `PidNet` (three copies: teacher frozen, student and fake score
trained, aux head off), `Discriminator_ImageDiT` and `dmd_losses`, composed as `PidDistillModel`'s student step
(teacher forcing, CFG-3 teacher with its feature forward, fake score, VSD + GAN, backward, clip, AdamW, EMA) and
fake step (student without gradient, DSM, three early-exit teacher passes, discriminator loss + R1, backward, clip,
two AdamW steps). The model class itself is not built: it needs upstream's config system (omegaconf, hydra, ...).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve()
_REPO_ROOT = _HERE.parents[3]


def time_distill_reference(
    upstream_dir: str | os.PathLike,
    preset: Any,
    size: Sequence[int],
    batch: int,
    dtype: str,
    repeats: int,
    python: str | os.PathLike | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    from pid_jax.errors import PidError
    from pid_jax.torch_reference import _check_size, _fail, _network_kwargs, _python, _run_worker, _static_problem

    py = _python(python)
    problem = _static_problem(upstream_dir, py)
    if problem:
        raise PidError(problem)
    name, kwargs, scale = _network_kwargs(preset)
    kwargs = dict(kwargs, lq_aux_rgb_head=False)
    h, w = _check_size(size, kwargs, scale, batch)
    payload = {"upstream": str(Path(upstream_dir).resolve()), "network": kwargs, "size": [h, w], "batch": batch,
               "dtype": dtype, "repeats": int(repeats)}  # fmt: skip
    code = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
    r = _run_worker(py, payload, timeout, argv=["-c", code, str(_HERE)], label="distillation iterations")
    if not r.get("ok"):
        raise _fail(py, r)
    r.pop("ok", None)
    r["preset"] = name
    return r


def _worker(a: dict[str, Any]) -> dict[str, Any]:
    import contextlib
    import copy
    import statistics

    import numpy as np

    from pid_jax.torch_reference import _build_net, _import_pidnet

    torch, PidNet = _import_pidnet(a["upstream"])
    sys.path.insert(0, a["upstream"])
    from pid._src.losses.dmd_losses import (
        denoising_score_matching_loss_flow,
        gan_loss_discriminator,
        gan_loss_generator,
        variational_score_distillation_loss,
    )
    from pid._src.networks.discriminators import Discriminator_ImageDiT

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(a["network"])
    b, (h, w) = int(a["batch"]), a["size"]
    scale = int(kw["latent_spatial_down_factor"]) * int(kw["sr_scale"])
    torch.manual_seed(0)
    teacher = _build_net(PidNet, kw, a["upstream"]).float().to(dev).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    fake = copy.deepcopy(teacher).train().requires_grad_(True)
    fi = {int(kw["patch_depth"]) // 2}
    disc = Discriminator_ImageDiT(
        feature_indices=fi, num_blocks=int(kw["patch_depth"]), inner_dim=int(kw["hidden_size"])
    )
    disc = disc.to(dev)
    opt_s = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.0, eps=1e-8)
    opt_f = torch.optim.AdamW(fake.parameters(), lr=1e-5, weight_decay=1e-3)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-5, weight_decay=0.0)
    ema = [p.detach().clone() for p in student.parameters()]
    gamma = float(np.roots([1, 7, 16 - 100.0, 12 - 100.0]).real.max())
    g = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.rand(b, 3, h, w, device=dev, generator=g) * 2 - 1
    y = torch.randn(b, min(int(kw["txt_max_length"]), 300), int(kw["txt_embed_dim"]), device=dev, generator=g)
    y_null = torch.randn(1, y.shape[1], y.shape[2], device=dev, generator=g).expand(b, -1, -1)
    z = torch.randn(b, int(kw["lq_latent_channels"]), h // scale, w // scale, device=dev, generator=g)
    t_list = torch.tensor([0.999, 0.866, 0.634, 0.342, 0.0], device=dev)
    use_autocast = dev == "cuda" and a["dtype"] == "bfloat16"
    it = [0]

    def ctx():
        return torch.autocast(dev, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()

    def bc(t):
        return t.view(-1, 1, 1, 1)

    def cond():
        apply = torch.rand(b, device=dev, generator=g) < 0.75
        sigma = torch.where(apply, torch.rand(b, device=dev, generator=g) * 0.8, torch.zeros(b, device=dev))
        zn = (1 - bc(sigma)) * z + bc(sigma) * torch.randn(z.shape, device=dev, generator=g)
        return zn, sigma

    def net_kw(zn, sigma):
        return dict(lq_video_or_image=None, lq_latent=zn, degrade_sigma=sigma)

    def x0_student(zn, sigma):
        noise = torch.randn(x0.shape, device=dev, generator=g)
        ts = t_list[torch.randint(0, 4, (b,), device=dev, generator=g)]
        x_in = (1 - bc(ts)) * x0 + bc(ts) * noise
        v = student(x_in, ts * 1000, y, **net_kw(zn, sigma))
        return (x_in.double() - bc(ts).double() * v.double()).float()

    def dmd_t():
        return torch.sigmoid(torch.randn(b, device=dev, generator=g)).clamp(0.02, 0.99)

    def clip(params):
        params = [p for p in params if p.grad is not None]
        for p in params:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        torch.nn.utils.clip_grad_norm_(params, 0.1)

    def student_step() -> float:
        zn, sigma = cond()
        with ctx():
            xs = x0_student(zn, sigma)
            t = dmd_t()
            eps = torch.randn(x0.shape, device=dev, generator=g)
            x_t = (1 - bc(t)) * xs + bc(t) * eps
            v_c, feats = teacher(x_t, t * 1000, y, **net_kw(zn, sigma), feature_indices=fi)
            with torch.no_grad():
                v_u = teacher(x_t, t * 1000, y_null, **net_kw(zn, sigma))
                v_t = v_u + 3.0 * (v_c.detach() - v_u)
                x0_t = (x_t.double() - bc(t).double() * v_t.double()).float()
                v_f = fake(x_t, t * 1000, y, **net_kw(zn, sigma))
                x0_f = (x_t.double() - bc(t).double() * v_f.double()).float()
            loss = variational_score_distillation_loss(xs, x0_t, x0_f) + 0.05 * gan_loss_generator(disc(feats))
        loss.backward()
        disc.zero_grad(set_to_none=True)
        clip(student.parameters())
        opt_s.step()
        opt_s.zero_grad(set_to_none=True)
        n = it[0]
        beta = 0.0 if n == 0 else (1 - 1 / (n + 1)) ** (gamma + 1)
        with torch.no_grad():
            for e, p in zip(ema, student.parameters(), strict=True):
                e.mul_(beta).add_(p.detach(), alpha=1 - beta)
        it[0] += 1
        return float(loss.detach())

    def fake_step() -> float:
        zn, sigma = cond()
        with ctx():
            with torch.no_grad():
                xs = x0_student(zn, sigma)
            t = dmd_t()
            eps = torch.randn(x0.shape, device=dev, generator=g)
            x_t = (1 - bc(t)) * xs + bc(t) * eps
            v_f = fake(x_t, t * 1000, y, **net_kw(zn, sigma))
            loss = denoising_score_matching_loss_flow(v_f, eps - xs)
            early = dict(net_kw(zn, sigma), feature_indices=fi, return_features_early=True)
            with torch.no_grad():
                f_fake = teacher(x_t, t * 1000, y, **early)
                real = (1 - bc(t)) * x0 + bc(t) * eps
                f_real = teacher(real, t * 1000, y, **early)
                f_alpha = teacher(real + 0.1 * torch.randn(real.shape, device=dev, generator=g), t * 1000, y, **early)
            l_real = disc(f_real)
            loss = loss + gan_loss_discriminator(l_real, disc(f_fake))
            loss = loss + 200.0 * torch.nn.functional.mse_loss(l_real, disc(f_alpha))
        loss.backward()
        clip(fake.parameters())
        for p in disc.parameters():
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        opt_f.step()
        opt_d.step()
        opt_f.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        return float(loss.detach())

    def timed(fn) -> tuple[float, float, float]:
        if dev == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0, loss

    out: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": dev}
    for name, fn in (("student", student_step), ("fake", fake_step)):
        timed(fn)  # warm-up
        times, cpu = [], []
        for _ in range(int(a["repeats"])):
            dt, dc, loss = timed(fn)
            times.append(dt)
            cpu.append(dc)
        out[name] = {"median_s": statistics.median(times), "cpu_s": statistics.median(cpu), "times_s": times,
                     "loss": loss}  # fmt: skip
    return out


def _main(argv: list[str]) -> int:
    sys.path.insert(0, str(_REPO_ROOT))
    from pid_jax.torch_reference import _WorkerFailure

    try:
        result, code = {"ok": True, **_worker(json.loads(argv[-1]))}, 0
    except _WorkerFailure as e:
        result, code = {"ok": False, "error": str(e), "missing": e.missing}, 1
    except Exception as e:  # anything from upstream or torch: still one JSON line
        msg = str(e).strip().splitlines()
        result, code = {"ok": False, "error": f"{type(e).__name__}: {msg[0] if msg else ''}"}, 1
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
