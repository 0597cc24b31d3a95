"""The optional PyTorch reference path: run upstream PiD's `PidNet` in a subprocess to dump or time it.

pid-jax never needs torch. This module is the one place that talks to it, and it does so through a
separate python (default `sys.executable`, or `python=`), so torch can live in another environment:

* driver side (imported by pid-jax, no torch): `reference_available`, `dump_reference`, `time_reference`;
* worker side: `python -m pid_jax.torch_reference '<json>'`, run with `PYTHONPATH=<repo root>`. The worker
  imports only the standard library, numpy, torch and the upstream checkout, never jax (importing
  `pid_jax` runs only the package `__init__`, which imports `pid_jax.errors`), and prints one JSON
  object as the last line of its stdout.

The dump has the layout of the parity fixtures (`in.x`, `in.t`, `in.y`, `in.lq_latent`,
`in.degrade_sigma`, `out`, and the `act.*` intermediates), so `pid_jax.parity.forward_parity` reads it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pid_jax.errors import CheckpointError, InputError, PidError

_REPO_ROOT = Path(__file__).resolve().parent.parent
_UPSTREAM_FILE = Path("pid") / "_src" / "networks" / "pid_net.py"
_TIMESCALE = 1000.0  # upstream's flow-matching timescale: the network sees t * 1000
_INSTALL_HINT = "install torch==2.13.0, numpy, loguru, pynvml and tqdm, or pass --torch-python"


# --- driver side (pid-jax's environment; no torch) ---------------------------------------------------


def _is_command_name(name: str) -> bool:
    return not any(sep and sep in name for sep in (os.sep, os.altsep))


def _python(python: str | os.PathLike | None) -> str:
    """The python to run: a path as given, a bare command name (`python3`) looked up on PATH as a shell does."""
    if python is None:
        return sys.executable
    name = str(python)
    if _is_command_name(name):
        return shutil.which(name) or name
    return name


def _static_problem(upstream_dir: str | os.PathLike, python: str) -> str | None:
    """What is missing that can be seen without starting the python, or None."""
    up = Path(upstream_dir)
    if not (up / _UPSTREAM_FILE).is_file():
        return (
            f"no upstream PiD checkout at {up} (expected {up / _UPSTREAM_FILE}; "
            "give the directory that contains the `pid` package)"
        )
    if not (Path(python).is_file() and os.access(python, os.X_OK)):
        where = f"named {python} on PATH" if _is_command_name(python) else f"at {python}"
        return f"no python {where} (pass --torch-python PATH to a python that has torch)"
    return None


def _missing_message(python: str, result: dict[str, Any]) -> str:
    """One line for a worker that could not import what the reference needs."""
    what = result.get("missing", "")
    detail = result.get("error", "")
    if what in ("torch", "numpy", "loguru"):
        return f"{what} is not importable in {python}: {_INSTALL_HINT}"
    if what == "upstream":
        return f"upstream PidNet does not import in {python}: {detail}"
    return detail or f"the torch reference in {python} failed"


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # The worker imports pid_jax.torch_reference from this checkout, whatever that python has installed.
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _run_worker(
    python: str, payload: dict[str, Any], timeout: float | None, argv: list[str] | None = None, label: str = ""
) -> dict[str, Any]:
    """Run one worker command and return its JSON; PidError (one line) on any failure.

    `argv` replaces this module's own worker (`python -m pid_jax.torch_reference PAYLOAD`), `label` the payload's
    `cmd` in messages: the training-step worker runs through here too.
    """
    cmd = [python, *(argv or ["-m", "pid_jax.torch_reference"]), json.dumps(payload)]
    what = label or payload["cmd"]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=_worker_env(), cwd=str(_REPO_ROOT), timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise PidError(f"torch reference ({what}) in {python} ran past {timeout} s") from None
    except OSError as e:
        raise PidError(f"cannot start {python}: {e.strerror or e}") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    result: dict[str, Any] | None = None
    if lines:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            result = None
    if not isinstance(result, dict):
        err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        last = err[-1].strip() if err else "(no stderr)"
        raise PidError(f"torch reference ({what}) in {python} exited with code {proc.returncode}: {last}")
    return result


def _fail(python: str, result: dict[str, Any]) -> PidError:
    if result.get("missing"):
        return PidError(_missing_message(python, result))
    return PidError(f"torch reference: {result.get('error', 'failed without a message')}")


def reference_available(upstream_dir: str | os.PathLike, python: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Whether upstream `PidNet` can run: the checkout exists and `python` imports torch, loguru and it.

    Returns (True, "torch <version> in <python>") or (False, a one-line message saying what is missing).
    Starting the python and importing torch takes several seconds.
    """
    py = _python(python)
    problem = _static_problem(upstream_dir, py)
    if problem:
        return False, problem
    try:
        r = _run_worker(py, {"cmd": "probe", "upstream": str(Path(upstream_dir).resolve())}, timeout=300)
    except PidError as e:
        return False, str(e)
    if not r.get("ok"):
        return False, str(_fail(py, r))
    return True, f"torch {r['torch']} in {py}, upstream at {upstream_dir}"


def _network_kwargs(preset: Any) -> tuple[str, dict[str, Any], int]:
    """(name, upstream PidNet kwargs, pixels per latent element) from a Preset, PidNetConfig, dict or name."""
    from pid_jax.config import PidNetConfig, Preset, load_config

    if isinstance(preset, PidNetConfig):
        name, net = "network", preset
    else:
        p = preset if isinstance(preset, Preset) else load_config(preset)
        name, net = p.name, p.network
    return name, net.to_dict(), net.pixel_scale


def _check_size(size: Sequence[int], kwargs: dict[str, Any], scale: int, batch: int) -> tuple[int, int]:
    if len(size) != 2:
        raise InputError(f"size must be (H, W), got {tuple(size)}")
    h, w = int(size[0]), int(size[1])
    step = math.lcm(scale, int(kwargs["patch_size"]))
    if h <= 0 or w <= 0 or h % step or w % step:
        raise InputError(f"size {h}x{w}: H and W must be positive multiples of {step} (latent scale and patch size)")
    if batch < 1:
        raise InputError(f"batch={batch} (expected >= 1)")
    return h, w


def _check_checkpoint(checkpoint: str | os.PathLike) -> str:
    p = Path(checkpoint)
    if p.is_dir():
        raise CheckpointError(f"{p}: the torch reference needs the released .pth file, not a converted directory")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    return str(p.resolve())


def _default_out(name: str, h: int, w: int, batch: int, seed: int) -> Path:
    return Path(tempfile.gettempdir()) / "pid-jax-reference" / f"{name}_{h}x{w}_b{batch}_s{seed}.npz"


def dump_reference(
    upstream_dir: str | os.PathLike,
    checkpoint: str | os.PathLike,
    preset: Any,
    size: Sequence[int] = (256, 256),
    batch: int = 1,
    seed: int = 0,
    python: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = print,
    t: Sequence[float] | None = None,
    timeout: float | None = None,
) -> Path:
    """Run one float32 CPU forward of upstream `PidNet` with `checkpoint` on seeded inputs; write an io.npz.

    `preset` is a Preset, a PidNetConfig, or anything `pid_jax.config.load_config` resolves. Inputs are
    drawn with numpy's generator seeded by `seed`: x, y and lq_latent standard normal, degrade_sigma
    uniform in [0, 1), t (already times 1000) = 999 * uniform unless `t` gives the [B] values. The file
    (written atomically) holds `in.*`, `out` and `act.*` as the parity fixtures do; returns its path.
    """
    py = _python(python)
    problem = _static_problem(upstream_dir, py)
    if problem:
        raise PidError(problem)
    ckpt = _check_checkpoint(checkpoint)
    name, kwargs, scale = _network_kwargs(preset)
    h, w = _check_size(size, kwargs, scale, batch)
    if t is not None and len(t) != batch:
        raise InputError(f"t has {len(t)} values for batch {batch}")
    dest = Path(out) if out is not None else _default_out(name, h, w, batch, seed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "cmd": "dump",
        "upstream": str(Path(upstream_dir).resolve()),
        "checkpoint": ckpt,
        "network": kwargs,
        "size": [h, w],
        "batch": batch,
        "seed": seed,
        "t": None if t is None else [float(v) for v in t],
        "out": str(dest.resolve()),
    }
    if progress:
        progress(f"running upstream PidNet ({name}, {h}x{w}, batch {batch}, float32 CPU) in {py}")
    t0 = time.perf_counter()
    r = _run_worker(py, payload, timeout)
    if not r.get("ok"):
        raise _fail(py, r)
    if progress:
        progress(
            f"wrote {dest} ({len(r.get('keys', []))} arrays, torch {r.get('torch')}, {time.perf_counter() - t0:.1f} s)"
        )
    return dest


def time_reference(
    upstream_dir: str | os.PathLike,
    preset: Any,
    size: Sequence[int],
    batch: int,
    steps: int,
    dtype: str,
    repeats: int,
    python: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    device: str = "auto",
    threads: int | None = None,
    seed: int = 0,
    timeout: float | None = None,
    cfg_scale: float | None = None,
) -> dict[str, Any]:
    """Time upstream's student sampler (`steps` network calls) and return the worker's JSON dict.

    With `cfg_scale` (an undistilled preset) it times upstream's own teacher sampler instead: `pid._src.modules.
    dpmsolver.DPMS` (multistep DPM-Solver++, order min(steps, 2), flow schedule, the preset's shift rule at this
    size) with classifier-free guidance, the model function being `PidModel._cfg_model_fn`'s two calls of B
    (unconditional on a random negative-prompt embedding, then conditional; both with the LQ latent).

    Random weights (torch's default init, seeded) unless `checkpoint` is given. The loop follows
    upstream `_student_sample_loop`: x0 = x - t v in float64, then x = (1 - t_next) x0 + t_next eps;
    the adapter runs inside every forward, as upstream does. float32 runs without autocast;
    bfloat16 runs under `torch.autocast(<device>, torch.bfloat16)` (upstream's CUDA configuration).
    One untimed-for-median warm-up run gives `first_s`; `median_s` is over `repeats` runs.
    Keys: median_s, first_s, times_s, peak_bytes (CUDA max allocated, or CPU max RSS), device,
    torch, threads, steps, t_list, size, batch, dtype, finite.
    """
    from pid_jax.sampler import t_schedule  # validates steps like our sampler does

    if dtype not in ("float32", "bfloat16"):
        raise InputError(f"dtype={dtype!r} (expected 'float32' or 'bfloat16')")
    if repeats < 1:
        raise InputError(f"repeats={repeats} (expected >= 1)")
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"device={device!r} (expected 'auto', 'cpu' or 'cuda')")
    py = _python(python)
    problem = _static_problem(upstream_dir, py)
    if problem:
        raise PidError(problem)
    name, kwargs, scale = _network_kwargs(preset)
    h, w = _check_size(size, kwargs, scale, batch)
    teacher: dict[str, Any] = {}
    if cfg_scale is not None:
        from pid_jax.config import Preset, load_config
        from pid_jax.teacher_sampler import orders

        orders(steps)  # validates the step count
        p = preset if isinstance(preset, Preset) else load_config(preset)
        teacher = {"sampler": "dpmpp", "cfg_scale": float(cfg_scale), "shift": p.sampler.shift_for(h, w)}
        t_list = []
    else:
        t_list = [float(v) for v in t_schedule(steps)]
    payload = {
        "cmd": "time",
        "upstream": str(Path(upstream_dir).resolve()),
        "checkpoint": None if checkpoint is None else _check_checkpoint(checkpoint),
        "network": kwargs,
        "size": [h, w],
        "batch": batch,
        "t_list": t_list,
        "dtype": dtype,
        "repeats": repeats,
        "device": device,
        "threads": threads,
        "seed": seed,
        "steps": steps,
        **teacher,
    }
    r = _run_worker(py, payload, timeout)
    if not r.get("ok"):
        raise _fail(py, r)
    r.pop("ok", None)
    r["preset"] = name
    return r


# --- worker side (the torch environment; stdlib + numpy + torch + upstream, never jax) ---------------


class _WorkerFailure(Exception):
    def __init__(self, message: str, missing: str | None = None):
        super().__init__(message)
        self.missing = missing


def _import_torch():
    try:
        import torch  # optional reference path
    except Exception as e:
        raise _WorkerFailure(f"{type(e).__name__}: {e}", missing="torch") from None
    return torch


def _import_pidnet(upstream: str):
    """Import torch, numpy, loguru and upstream `PidNet` from the checkout at `upstream`."""
    torch = _import_torch()
    for mod in ("numpy", "loguru"):
        try:
            __import__(mod)
        except Exception as e:
            raise _WorkerFailure(f"{type(e).__name__}: {e}", missing=mod) from None
    if upstream not in sys.path:
        sys.path.insert(0, upstream)
    try:
        from pid._src.networks.pid_net import PidNet  # optional reference path
    except Exception as e:
        raise _WorkerFailure(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "upstream") from None
    return torch, PidNet


def _build_net(PidNet, kwargs: dict[str, Any], upstream: str):
    import inspect

    accepted = set(inspect.signature(PidNet.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise _WorkerFailure(f"PidNetConfig argument(s) {unknown} are not upstream PidNet arguments ({upstream})")
    return PidNet(**kwargs)


def _load_checkpoint(torch, net, path: str) -> None:
    """Load like upstream's inference model: `net.` keys, dropping the EMA/critic/discriminator copies."""
    sd = torch.load(path, map_location="cpu", weights_only=True)  # optional reference path
    if not isinstance(sd, dict):
        raise _WorkerFailure(f"{path}: expected a state dict, got {type(sd).__name__}")
    drop = ("net_ema.", "fake_score.", "discriminator.")
    mapped = {}
    for k, v in sd.items():
        if k.startswith(drop):
            continue
        mapped[k[len("net.") :] if k.startswith("net.") else k] = v
    want = set(net.state_dict())
    missing, unexpected = sorted(want - set(mapped)), sorted(set(mapped) - want)
    if missing or unexpected:
        raise _WorkerFailure(
            f"{path} does not match upstream PidNet: {len(missing)} missing {missing[:4]}, "
            f"{len(unexpected)} unexpected {unexpected[:4]}"
        )
    net.load_state_dict(mapped, strict=True)  # copies the bf16 tensors into the float32 network


def _hook_activations(net, acts: dict) -> list:
    """Forward hooks that record the fixture README's `act.*` tensors (float32 numpy) into `acts`."""

    def keep(name: str, tensor) -> None:
        acts[f"act.{name}"] = tensor.detach().float().cpu().numpy()

    def hook(fn):
        def run(_mod, _inp, out) -> None:
            fn(out)  # return None: a forward hook's non-None return value would replace the module output

        return run

    handles = [
        net.lq_proj.register_forward_hook(hook(lambda out: [keep(f"lq_proj.{i}", o) for i, o in enumerate(out)]))
    ]
    for i, g in enumerate(net.lq_proj.gate_modules):
        handles.append(g.register_forward_hook(hook(lambda out, i=i: keep(f"gate.{i}", out))))
    for i, blk in enumerate(net.patch_blocks):
        handles.append(
            blk.register_forward_hook(
                hook(lambda out, i=i: (keep(f"patch_block.{i}.0", out[0]), keep(f"patch_block.{i}.1", out[1])))
            )
        )
    if getattr(net, "pit_lq_gate", None) is not None:
        handles.append(net.pit_lq_gate.register_forward_hook(hook(lambda out: keep("pit_lq_gate", out))))
    for j, blk in enumerate(net.pixel_blocks):
        handles.append(blk.register_forward_hook(hook(lambda out, j=j: keep(f"pixel_block.{j}", out))))
    handles.append(net.final_layer.register_forward_hook(hook(lambda out: keep("final_layer", out))))
    return handles


def _atomic_savez(dest: str, arrays: dict) -> None:
    import numpy as np

    tmp = f"{dest}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
            np.savez(f, **arrays)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _worker_probe(a: dict[str, Any]) -> dict[str, Any]:
    torch, _ = _import_pidnet(a["upstream"])
    return {"torch": torch.__version__, "cuda": bool(torch.cuda.is_available()), "jax_imported": "jax" in sys.modules}


def _worker_dump(a: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    torch, PidNet = _import_pidnet(a["upstream"])
    kw = a["network"]
    b, (h, w) = int(a["batch"]), a["size"]
    scale = int(kw["latent_spatial_down_factor"]) * int(kw["sr_scale"])
    rng = np.random.default_rng(int(a["seed"]))
    inputs = {
        "in.x": rng.standard_normal((b, 3, h, w), dtype=np.float32),
        "in.t": (np.asarray(a["t"], np.float32) if a["t"] is not None else 999.0 * rng.random(b, dtype=np.float32)),
        "in.y": rng.standard_normal((b, int(kw["txt_max_length"]), int(kw["txt_embed_dim"])), dtype=np.float32),
        "in.lq_latent": rng.standard_normal((b, int(kw["lq_latent_channels"]), h // scale, w // scale), np.float32),
        "in.degrade_sigma": rng.random(b, dtype=np.float32),
    }
    torch.manual_seed(int(a["seed"]))
    net = _build_net(PidNet, kw, a["upstream"]).float().eval()
    _load_checkpoint(torch, net, a["checkpoint"])
    acts: dict = {}
    handles = _hook_activations(net, acts)
    x, t, y, z, s = (torch.from_numpy(inputs[k]) for k in ("in.x", "in.t", "in.y", "in.lq_latent", "in.degrade_sigma"))
    with torch.inference_mode():
        out = net(x, t, y, lq_video_or_image=None, lq_latent=z, degrade_sigma=s)
    for hd in handles:
        hd.remove()
    arrays = {**inputs, **acts, "out": out.float().numpy()}
    meta = {"torch": torch.__version__, "upstream": a["upstream"], "checkpoint": a["checkpoint"], "seed": a["seed"]}
    arrays["meta"] = np.asarray(json.dumps(meta))
    _atomic_savez(a["out"], arrays)
    return {"out": a["out"], "keys": sorted(arrays), "torch": torch.__version__}


def _worker_time(a: dict[str, Any]) -> dict[str, Any]:
    import contextlib
    import statistics

    torch, PidNet = _import_pidnet(a["upstream"])
    if a.get("threads"):
        torch.set_num_threads(int(a["threads"]))
    dev = a["device"]
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise _WorkerFailure("device='cuda' but torch.cuda.is_available() is False")
    kw = a["network"]
    b, (h, w) = int(a["batch"]), a["size"]
    scale = int(kw["latent_spatial_down_factor"]) * int(kw["sr_scale"])
    torch.manual_seed(int(a["seed"]))
    t_build = time.perf_counter()
    net = _build_net(PidNet, kw, a["upstream"]).float().eval()  # torch's default init; weights don't change cost
    if a.get("checkpoint"):
        _load_checkpoint(torch, net, a["checkpoint"])
    net = net.to(dev)
    build_s = time.perf_counter() - t_build
    gen = torch.Generator(device=dev).manual_seed(int(a["seed"]))
    y = torch.randn(b, int(kw["txt_max_length"]), int(kw["txt_embed_dim"]), device=dev, generator=gen)
    z = torch.randn(b, int(kw["lq_latent_channels"]), h // scale, w // scale, device=dev, generator=gen)
    sigma = torch.zeros(b, device=dev)
    t_list = torch.tensor(a["t_list"], dtype=torch.float32, device=dev)
    use_autocast = a["dtype"] == "bfloat16"
    if a.get("sampler") == "dpmpp":
        sample = _upstream_teacher_sampler(torch, a, net, y, z, sigma, gen, dev, b, h, w, use_autocast)
    else:
        sample = None

    def student_sample():
        # upstream _student_sample_loop (SDE, velocity); one step is the single call at t = 1.0
        x = torch.randn(b, 3, h, w, device=dev, generator=gen)
        ctx = torch.autocast(dev, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
        with ctx:
            for t_cur, t_next in zip(t_list[:-1], t_list[1:], strict=True):
                t_b = t_cur.expand(b)
                v = net(x, t_b * _TIMESCALE, y, lq_video_or_image=None, lq_latent=z, degrade_sigma=sigma)
                x0 = (x.double() - t_b.double().view(b, 1, 1, 1) * v.double()).to(x.dtype)
                if t_next.item() > 0:
                    eps = torch.randn(x0.shape, device=dev, dtype=x0.dtype, generator=gen)
                    x = (1.0 - t_next) * x0 + t_next * eps
                else:
                    x = x0
        return x.clamp(-1, 1)

    sample = sample or student_sample

    def timed():
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = sample()
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, x

    with torch.inference_mode():
        first_s, x = timed()
        times = [timed()[0] for _ in range(int(a["repeats"]))]
    finite = bool(torch.isfinite(x).all().item())
    if dev == "cuda":
        peak = int(torch.cuda.max_memory_allocated())
        name = torch.cuda.get_device_name()
    else:
        from pid_jax.rss import peak_rss_bytes

        peak = peak_rss_bytes()
        import platform

        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "median_s": statistics.median(times),
        "first_s": first_s,
        "times_s": times,
        "build_s": build_s,
        "peak_bytes": peak,
        "peak_kind": "cuda_max_allocated" if dev == "cuda" else "cpu_max_rss",
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": int(a.get("steps") or len(a["t_list"]) - 1),
        "t_list": a["t_list"],
        "sampler": a.get("sampler", "student"),
        "cfg_scale": a.get("cfg_scale"),
        "shift": a.get("shift"),
        "size": [h, w],
        "batch": b,
        "dtype": a["dtype"],
        "autocast": f"{dev}/bfloat16" if use_autocast else None,
        "finite": finite,
        "params": sum(p.numel() for p in net.parameters()),
    }


def _upstream_teacher_sampler(torch, a, net, y, z, sigma, gen, dev, b, h, w, use_autocast):
    """Upstream's own teacher sampler on `net`: DPMS from pid._src.modules.dpmsolver, as
    `PidModel.generate_samples_from_batch` configures it, with its two-call CFG model function."""
    import contextlib

    os.environ.setdefault("DPM_TQDM", "True")  # upstream's switch that turns its progress bar off
    try:
        from pid._src.modules.dpmsolver import DPMS  # optional reference path
    except Exception as e:
        raise _WorkerFailure(f"upstream DPMS does not import: {type(e).__name__}: {e}", missing="upstream") from None
    cfg_scale, steps, shift = float(a["cfg_scale"]), int(a["steps"]), float(a["shift"])
    y_null = torch.randn(1, *y.shape[1:], device=dev, generator=gen)  # stands for the negative prompt

    def forward(x, timestep, y, mask=None, **kw):  # PidModel's _forward_fn (cfg_scale 1)
        y = y.squeeze(1) if y.dim() == 4 else y
        return net(x, timestep, y, lq_video_or_image=None, lq_latent=z, degrade_sigma=sigma)

    def cfg_forward(x, timestep, y, mask=None, **kw):  # PidModel's _cfg_model_fn: [uncond; cond], two calls of B
        half = x.shape[0] // 2
        y = y.squeeze(1) if y.dim() == 4 else y
        kw = dict(lq_video_or_image=None, lq_latent=z, degrade_sigma=sigma)
        u = net(x[:half], timestep[:half], y[:half], **kw)
        c = net(x[half:], timestep[half:], y[half:], **kw)
        return torch.cat([u, c], dim=0)

    def sample():
        x = torch.randn(b, 3, h, w, device=dev, generator=gen)
        ctx = torch.autocast(dev, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
        with ctx:
            solver = DPMS(
                cfg_forward if cfg_scale != 1.0 else forward,
                condition=y.unsqueeze(1),
                uncondition=y_null.unsqueeze(1).repeat(b, 1, 1, 1),
                cfg_scale=cfg_scale,
                model_type="flow",
                guidance_type="classifier-free",
                model_kwargs={},
                schedule="FLOW",
                interval_guidance=[0, 1],
            )
            out = solver.sample(
                x, steps=steps, order=min(steps, 2), skip_type="time_uniform_flow", method="multistep", flow_shift=shift
            )
        return out.clamp(-1, 1)

    return sample


_COMMANDS = {"probe": _worker_probe, "dump": _worker_dump, "time": _worker_time}


def _worker_main(argv: list[str] | None = None) -> int:
    """Entry of `python -m pid_jax.torch_reference '<json>'`; the last stdout line is the JSON result."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) != 1:
            raise _WorkerFailure("usage: python -m pid_jax.torch_reference '<json arguments>'")
        a = json.loads(argv[0])
        fn = _COMMANDS.get(a.get("cmd"))
        if fn is None:
            raise _WorkerFailure(f"unknown command {a.get('cmd')!r} (expected one of {sorted(_COMMANDS)})")
        result = {"ok": True, **fn(a)}
        code = 0
    except _WorkerFailure as e:
        result, code = {"ok": False, "error": str(e), "missing": e.missing}, 1
    except Exception as e:  # anything else from upstream or torch: still one JSON line
        msg = str(e).strip().splitlines()
        result, code = {"ok": False, "error": f"{type(e).__name__}: {msg[0] if msg else ''}"}, 1
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(_worker_main())
