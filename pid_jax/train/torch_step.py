"""Timing upstream's training step in PyTorch, for `pid-jax bench --train --torch-reference`.

Driver side (no torch): `time_train_reference(...)` runs this file in a python that has torch, as
`pid_jax.torch_reference` does for decoding. The file is run by path (never imported as part of
`pid_jax.train`, whose package imports JAX); it imports only the standard library, numpy, torch, the
upstream checkout and `pid_jax.torch_reference` (stdlib-only on import).

The step is upstream's teacher/full flow-matching step as its trainer runs it: logit-normal t with the
dynamic shift, x_t = (1 - t) x0 + t noise, latent noising of the LQ condition, upstream `PidNet` forward
(with the aux RGB head's output for the teacher), MSE against noise - x0 (+ 0.8 YCbCr Charbonnier on the
antialiased-bicubic LQ image), backward, nan_to_num + global-norm clip 0.1, AdamW, power-EMA update of the
trained tensors. float32 on CPU; on CUDA the forward runs under autocast bf16 (upstream's configuration).
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
_REPO_ROOT = _HERE.parents[2]


# --- driver side -------------------------------------------------------------------------------------


def time_train_reference(
    upstream_dir: str | os.PathLike,
    preset: Any,
    size: Sequence[int],
    batch: int,
    stage: str,
    dtype: str,
    repeats: int,
    python: str | os.PathLike | None = None,
    threads: int | None = None,
    seed: int = 0,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Median time of upstream's training step (random weights, torch's default init) and the worker's facts."""
    from pid_jax.errors import InputError, PidError
    from pid_jax.torch_reference import _check_size, _fail, _network_kwargs, _python, _run_worker, _static_problem

    if stage not in ("teacher", "full"):
        raise InputError(f"stage={stage!r} (expected 'teacher' or 'full')")
    if dtype not in ("float32", "bfloat16"):
        raise InputError(f"dtype={dtype!r} (expected 'float32' or 'bfloat16')")
    py = _python(python)
    problem = _static_problem(upstream_dir, py)
    if problem:
        raise PidError(problem)
    name, kwargs, scale = _network_kwargs(preset)
    h, w = _check_size(size, kwargs, scale, batch)
    payload = {
        "upstream": str(Path(upstream_dir).resolve()),
        "network": kwargs,
        "size": [h, w],
        "batch": batch,
        "stage": stage,
        "dtype": dtype,
        "repeats": int(repeats),
        "threads": threads,
        "seed": seed,
    }
    # By file path, so the worker never imports the package (and with it JAX) beside torch.
    code = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
    r = _run_worker(py, payload, timeout, argv=["-c", code, str(_HERE)], label="train step")
    if not r.get("ok"):
        raise _fail(py, r)
    r.pop("ok", None)
    r["preset"] = name
    return r


# --- worker side (torch) -----------------------------------------------------------------------------


def _power_ema_gamma(sigma_rel: float = 0.1) -> float:
    import numpy as np

    return float(np.roots([1, 7, 16 - sigma_rel**-2, 12 - sigma_rel**-2]).real.max())


def _worker(a: dict[str, Any]) -> dict[str, Any]:
    import contextlib
    import statistics

    from pid_jax.torch_reference import _build_net, _import_pidnet

    torch, PidNet = _import_pidnet(a["upstream"])
    F = torch.nn.functional
    if a.get("threads"):
        torch.set_num_threads(int(a["threads"]))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(a["network"])
    b, (h, w) = int(a["batch"]), a["size"]
    scale = int(kw["latent_spatial_down_factor"]) * int(kw["sr_scale"])
    teacher = a["stage"] == "teacher"
    aux_w = 0.8 if (teacher and kw.get("lq_aux_rgb_head")) else 0.0
    torch.manual_seed(int(a["seed"]))
    t_build = time.perf_counter()
    net = _build_net(PidNet, kw, a["upstream"]).float().to(dev).train()
    if teacher:  # upstream's train_lq_proj_only: the adapter trains, the backbone is frozen
        for n, p in net.named_parameters():
            p.requires_grad_(n.startswith(("lq_proj.", "pit_lq_gate.")))
    params = [p for p in net.parameters() if p.requires_grad]
    lr, wd = (5e-5, 1e-3) if teacher else (1e-5, 0.0)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    ema = [p.detach().clone() for p in params]
    gamma = _power_ema_gamma()
    build_s = time.perf_counter() - t_build

    g = torch.Generator(device=dev).manual_seed(int(a["seed"]))
    x0 = torch.rand(b, 3, h, w, device=dev, generator=g) * 2 - 1
    y = torch.randn(b, min(int(kw["txt_max_length"]), 300), int(kw["txt_embed_dim"]), device=dev, generator=g)
    z = torch.randn(b, int(kw["lq_latent_channels"]), h // scale, w // scale, device=dev, generator=g)
    shift = 6.0 * ((h * w) ** 0.5 / 2048.0) ** 0.5  # upstream's dynamic shift
    ycc = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], device=dev)
    chan_w = torch.tensor([0.25, 1.0, 1.0], device=dev).view(1, 3, 1, 1)
    use_autocast = dev == "cuda" and a["dtype"] == "bfloat16"
    step_idx = [0]

    def step() -> float:
        u = torch.sigmoid(torch.randn(b, device=dev, generator=g))
        t = shift * u / (1 + (shift - 1) * u)
        noise = torch.randn(x0.shape, device=dev, generator=g)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        apply = torch.rand(b, device=dev, generator=g) < 0.75
        sigma = torch.where(apply, torch.rand(b, device=dev, generator=g) * 0.8, torch.zeros(b, device=dev))
        zn = (1 - sigma.view(-1, 1, 1, 1)) * z + sigma.view(-1, 1, 1, 1) * torch.randn(z.shape, device=dev, generator=g)
        keep = (torch.rand(b, device=dev, generator=g) >= 0.1).float()  # LQ-latent dropout
        zn = zn * keep.view(-1, 1, 1, 1)
        ctx = torch.autocast(dev, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
        with ctx:
            out = net(
                x_t, 1000 * t, y, lq_video_or_image=None, lq_latent=zn, degrade_sigma=sigma, return_lq_aux=bool(aux_w)
            )
        v, lq_aux = out if aux_w else (out, None)
        loss = ((v.float() - (noise - x0)) ** 2).mean()
        if aux_w:
            pred = lq_aux["pred_lq_rgb"].float()
            lq = F.interpolate(x0, size=(h // 4, w // 4), mode="bicubic", align_corners=False, antialias=True)
            lq = lq.clamp(-1, 1)
            if lq.shape[-2:] != pred.shape[-2:]:
                lq = F.interpolate(lq, size=pred.shape[-2:], mode="area")
            d = torch.einsum("ij,bjhw->bihw", ycc, (pred - lq) * 0.5) * chan_w
            per = (torch.sqrt(d * d + 1e-6) - 1e-3).mean(dim=(1, 2, 3))
            m = (lq.abs().flatten(1).mean(1) > 1e-6).float() * keep * (1 - sigma)
            loss = loss + aux_w * (per * m).sum() / m.sum().clamp_min(1e-6)
        loss.backward()
        for p in params:
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        n = step_idx[0]
        beta = 0.0 if n == 0 else (1 - 1 / (n + 1)) ** (gamma + 1)
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                e.mul_(beta).add_(p.detach(), alpha=1 - beta)
        step_idx[0] += 1
        return float(loss.detach())

    def timed() -> tuple[float, float, float]:
        if dev == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0, loss

    first_s, _, loss = timed()
    times, cpu = [], []
    for _ in range(int(a["repeats"])):
        dt, dc, loss = timed()
        times.append(dt)
        cpu.append(dc)
    if dev == "cuda":
        peak, kind, name = int(torch.cuda.max_memory_allocated()), "cuda_max_allocated", torch.cuda.get_device_name()
    else:
        import platform

        from pid_jax.rss import peak_rss_bytes

        peak, kind = peak_rss_bytes(), "cpu_max_rss"
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "median_s": statistics.median(times),
        "first_s": first_s,
        "times_s": times,
        "cpu_s": statistics.median(cpu),
        "build_s": build_s,
        "peak_bytes": peak,
        "peak_kind": kind,
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "stage": a["stage"],
        "size": [h, w],
        "batch": b,
        "dtype": a["dtype"],
        "autocast": f"{dev}/bfloat16" if use_autocast else None,
        "loss": loss,
        "trained_params": sum(p.numel() for p in params),
        "params": sum(p.numel() for p in net.parameters()),
    }


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
