"""The training run: data -> jitted train step over a device mesh -> periodic saves, logs, sample decodes.

A run lives in one directory:
  run.json              what defines the run (preset, train config, data, batch, size, seed, ...); a resume
                        must match it
  checkpoints/<step>/   Orbax train state + data position (`checkpoint.TrainCheckpointer`)
  metrics.jsonl         one JSON object per step (loss, loss_fm, loss_rgb, grad_norm, skipped, lr, steps/s)
  tb/                   TensorBoard event files (when tensorboardX is installed)
  samples/step_<n>.png  periodic decodes of a fixed batch with the EMA weights (the 4-step sampler; a teacher
                        run: DPM-Solver++ with the preset's guidance, as upstream samples its teachers)
  log.txt               the run's messages (initialised keys of a teacher init, resumes, saves)
  final/                the EMA weights at the end: a converted directory and model_ema_bf16.pth

Data parallelism: the batch is sharded over the mesh's `data` axis (and image rows over `seq`); parameters
and optimizer state are replicated; the step's losses are means over the global batch, so gradients are the
data-parallel average. With several processes (`jax.distributed.initialize`) each process reads only its
slice of every global batch (`data.make_dataset`) and the global batch is assembled from the pieces.
Everything random is a function of the seed and the step / sample index, so a run resumed from any saved
step ends bit-identical to one that was never interrupted, on any number of devices or processes up to
floating-point reduction order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pid_jax import files
from pid_jax.config import Preset, load_config
from pid_jax.errors import CheckpointError, InputError
from pid_jax.files import absolute
from pid_jax.sharding import DATA, SEQ, make_mesh
from pid_jax.train import data as data_lib
from pid_jax.train.config import TrainConfig

RUN_FORMAT = 1
# What a resumed run must share with the run it continues (the rest -- steps, save/sample/log cadence,
# workers -- may change between invocations).
IDENTITY_KEYS = (
    "preset", "train", "data", "batch", "size", "seed", "init", "latent", "null_caption", "gemma", "alpha", "skipped",
    "teacher", "negative_caption",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RunOptions:
    config: str
    data: str
    out: str
    stage: str = "teacher"
    steps: int = 1000
    batch: int | None = None  # None: one image per device of the mesh's data axis
    size: tuple[int, int] = (256, 256)
    init: str | None = None
    gemma: str | None = None
    null_caption: str | None = None
    vae: str | None = None
    vae_kind: str | None = None
    alpha: str = "refuse"
    seed: int = 0
    mesh: tuple[int, int] | None = None
    save_every: int = 500
    sample_every: int = 0
    log_every: int = 10
    workers: int = 0
    resume: bool = False
    skip_bad: bool = False
    export: bool = True
    attn: str = "auto"
    shard_state: str = "auto"
    train_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    teacher: str | None = None  # --stage distill: the teacher checkpoint (student and fake score start from it)
    negative_caption: str | None = None  # --stage distill: the CFG null embedding [L, D] (.npy) without --gemma


Progress = Callable[[str], None]


class _Log:
    """Messages to stderr and RUN_DIR/log.txt (process 0 writes the file)."""

    def __init__(self, progress: Progress, path: Path | None):
        self._progress, self._path = progress, path

    def __call__(self, msg: str) -> None:
        self._progress(msg)
        if self._path is not None:
            with open(self._path, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")


# --- validation (everything here runs before any compile) -------------------------------------------


def _latent_mode(preset: Preset, records: list[data_lib.Record], opts: RunOptions) -> str:
    cfg = preset.network
    if records[0].latent is not None:
        return "precomputed"
    if opts.vae:
        return "vae"
    from pid_jax.train.encoders import is_pixel_space

    if is_pixel_space(preset):
        return "pixel"
    raise InputError(
        f"{preset.name} reads {cfg.lq_latent_channels}-channel latents: give --vae FILE (the VAE to encode the "
        "LQ images with) or precomputed <stem>.latent.npy files"
    )


def _check_size(preset: Preset, size: tuple[int, int], mesh_shape: tuple[int, int]) -> None:
    cfg = preset.network
    h, w = size
    step = math.lcm(cfg.pixel_scale, cfg.patch_size)
    if h <= 0 or w <= 0 or h % step or w % step:
        raise InputError(f"--size {h}x{w}: height and width must be positive multiples of {step} for {preset.name}")
    if (h // cfg.patch_size) % mesh_shape[1]:
        raise InputError(
            f"--size {h}x{w}: {h // cfg.patch_size} patch rows are not divisible by the mesh's sequence axis "
            f"({mesh_shape[1]})"
        )


def train_config(opts: RunOptions) -> TrainConfig:
    return TrainConfig.for_stage(opts.stage, **opts.train_overrides)


# --- stages: what differs between flow-matching training and distillation ---------------------------------


class FlowStage:
    """Stages "teacher" and "full": one network, `train_step` (flow matching, + aux RGB for the teacher)."""

    def __init__(self, opts: RunOptions, preset: Preset):
        self.opts, self.preset = opts, preset
        self.cfg = train_config(opts)
        self.cfg.resolved_aux_weight(preset.network.lq_aux_rgb_head)  # refuses --aux-weight without the aux head
        if opts.teacher or opts.negative_caption:
            raise InputError("--teacher and --negative-caption are for --stage distill")

    def build(self, log: Progress, null: np.ndarray, gemma_encode) -> tuple[Any, Any]:
        from pid_jax.train.state import init_train_state

        model = _load_network(self.preset, self.opts, log)
        return init_train_state(model, self.cfg, self.opts.seed)

    def compile(self, graph, state_sharding, mesh):
        from pid_jax.train.step import train_step

        fn = jax.jit(
            lambda s, b: train_step(graph, self.cfg, s, b),
            donate_argnums=0,
            out_shardings=(state_sharding, NamedSharding(mesh, P())),
        )
        return lambda state, batch, it: fn(state, batch)

    def ema_model(self, graph, state):
        from pid_jax.train.state import merged_model

        return merged_model(graph, state, use_ema=True)

    def skipped(self, state) -> int:
        return int(_local(state.skipped))


def make_stage(opts: RunOptions, preset: Preset):
    if opts.stage == "distill":
        from pid_jax.train.distill.stage import DistillStage

        return DistillStage(opts, preset)
    return FlowStage(opts, preset)


def _identity(opts: RunOptions, preset: Preset, tcfg, latent: str) -> dict[str, Any]:
    return {
        "format": RUN_FORMAT,
        "preset": preset.to_dict(),
        "train": tcfg.to_dict(),
        "data": str(Path(opts.data).resolve()),
        "batch": opts.batch,
        "size": list(opts.size),
        "seed": opts.seed,
        "init": str(Path(opts.init).resolve()) if opts.init else None,
        "latent": latent if latent != "vae" else f"vae:{Path(opts.vae).resolve()}",
        "null_caption": str(Path(opts.null_caption).resolve()) if opts.null_caption else None,
        "gemma": opts.gemma,
        # Only when not the default, so runs recorded before these keys existed still resume.
        **({"alpha": opts.alpha} if opts.alpha != "refuse" else {}),
        "stage": opts.stage,
        "teacher": str(Path(opts.teacher).resolve()) if opts.teacher else None,
        "negative_caption": str(Path(opts.negative_caption).resolve()) if opts.negative_caption else None,
    }


def _check_run_dir(out: Path, ident: dict[str, Any], resume: bool) -> None:
    run_json = out / "run.json"
    if not resume:
        if run_json.exists() or (out / "checkpoints").exists():
            raise InputError(f"--out {out} already holds a run: pass --resume to continue it, or choose another --out")
        return
    if not run_json.exists():
        raise InputError(f"--resume: {out} holds no run (no run.json)")
    try:
        saved = json.loads(run_json.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{run_json}: unreadable ({e})") from None
    diff = [k for k in IDENTITY_KEYS if saved.get(k) != ident.get(k)]
    if saved.get("format") != RUN_FORMAT or diff:
        raise InputError(
            f"--resume: the run in {out} was started with other settings ({', '.join(diff) or 'format'} differ); "
            "resume with the same --config, --stage, --data, --batch, --size, --seed, --init and optimizer flags"
        )


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# --- building blocks ------------------------------------------------------------------------------


def _local(tree: Any) -> Any:
    """A global pytree as whole arrays on this process's first device (for sampling, export). A collective
    when the tree is sharded over several processes: every process calls it."""
    from pid_jax.train.shard import gather_local

    return gather_local(tree)


def _global_batch(local: dict[str, np.ndarray], mesh, global_batch: int) -> dict[str, jax.Array]:
    out = {}
    for k, v in local.items():
        spec = P(DATA, None, SEQ, None) if k == "x0" else P(DATA, *([None] * (v.ndim - 1)))
        shape = (global_batch, *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), v, shape)
    return out


def _latent_encoder(mode: str, preset: Preset, opts: RunOptions, tcfg):
    """image batch -> clean LQ latent, or None when the data brings it (precomputed)."""
    from pid_jax.train.resize import lq_image

    cfg = preset.network
    if mode == "precomputed":
        return None
    if mode == "pixel":
        from pid_jax.train.encoders import identity_encoder

        return jax.jit(lambda x0: identity_encoder(lq_image(x0, cfg.sr_scale)))
    from pid_jax.vae import load_vae, vae_kind_for_backbone

    kind = opts.vae_kind or (vae_kind_for_backbone(preset.backbones[0]) if preset.backbones else None)
    if kind is None:
        raise InputError(f"{preset.name} names no backbone: give --vae-kind for --vae {opts.vae}")
    vae = load_vae(kind, opts.vae, dtype=tcfg.dtype)
    if vae.config.latent_channels != cfg.lq_latent_channels:
        raise InputError(
            f"--vae {opts.vae} ({kind}) gives {vae.config.latent_channels}-channel latents, "
            f"{preset.name} reads {cfg.lq_latent_channels}"
        )
    shrink = jax.jit(lambda x0: lq_image(x0, cfg.sr_scale))
    return lambda x0: vae.encode(shrink(x0))  # upstream: z = VAE.enc(LQ image)


def _load_network(preset: Preset, opts: RunOptions, log: Progress):
    from pid_jax.train.init import init_like_upstream, load_init

    if opts.init:
        if not Path(opts.init).exists():
            raise CheckpointError(f"--init {opts.init}: no such checkpoint file")
        model, initialised = load_init(opts.init, preset.network, opts.stage, seed=opts.seed, attn_impl=opts.attn)
        note = f"; {len(initialised)} adapter key(s) missing, initialised as upstream:" if initialised else ""
        log(f"loaded {opts.init}{note}")
        for k in initialised:
            log(f"  initialised {k}")
    else:
        model = init_like_upstream(preset.network, opts.seed, attn_impl=opts.attn)
        log("no --init: the whole network initialised as upstream's init_weights (training from scratch)")
    return model


class _Progress:
    """A live one-line bar on a terminal (step, loss, steps/s, ETA); plain lines every `every` steps otherwise."""

    def __init__(self, total: int, start: int, every: int, stream=None):
        stream = sys.stderr if stream is None else stream  # looked up now: sys.stderr may have been replaced
        self.total, self.start, self.every, self.stream = total, start, max(1, every), stream
        self.tty = stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, m: dict[str, float]) -> float:
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "--:--:--"
        line = (
            f"step {step}/{self.total}  loss {m['loss']:.4f}  grad {m['grad_norm']:.3g}  "
            f"{rate:.2f} steps/s  ETA {eta_s}"
        )
        if self.tty:
            width = 30
            fill = int(width * step / max(self.total, 1))
            self.stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {line}   ")
            if step == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            print(f"[pid-jax] {line}", file=self.stream, flush=True)
        return rate


class _Metrics:
    """metrics.jsonl (+ TensorBoard). On resume, lines past the restored step (run after the last save of the
    interrupted run) are dropped, so the file reads as one run."""

    def __init__(self, out: Path, resumed_step: int, enabled: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resumed_step:
                        keep.append(line)
                except ValueError:
                    break  # a line cut by the kill: drop it and what follows
            tmp = self.path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(x + "\n" for x in keep))
            os.replace(tmp, self.path)
        try:
            from tensorboardX import SummaryWriter  # optional
        except ImportError:
            SummaryWriter = None
        if SummaryWriter is not None:
            self.tb = SummaryWriter(str(out / "tb"))

    def write(self, step: int, m: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **m}) + "\n")
        if self.tb is not None:
            for k, v in m.items():
                if not isinstance(v, str):  # a distillation line names its phase
                    self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _Interrupt:
    """Ctrl-C during training: the first SIGINT finishes the step, saves it and ends the run cleanly (exit 130,
    `--resume` continues); a second one aborts at once (KeyboardInterrupt). Single-process runs only; with
    several processes SIGINT keeps its default (abort; --resume from the last periodic save)."""

    def __init__(self, log: Progress, enabled: bool = True):
        self.log, self.enabled, self.requested, self._prev = log, enabled, False, None
        self._shielded = self._abort = False

    def _handler(self, signum, frame) -> None:
        if self.requested:
            if self._shielded:  # raised inside Orbax's save, it would leave its writer waiting for a signal forever
                self._abort = True
                return
            raise KeyboardInterrupt
        self.requested = True
        self.log("interrupt: saving after this step (Ctrl-C again to abort without saving)")

    def __enter__(self) -> _Interrupt:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
            self._prev = None

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        """A save in progress: a second Ctrl-C aborts once it has returned, not in the middle of it."""
        self._shielded = True
        try:
            yield
        finally:
            self._shielded = False
        if self._abort:
            raise KeyboardInterrupt


# What a run writes into its directory (removed again when a new run fails before its first save).
RUN_ENTRIES = ("run.json", "log.txt", "metrics.jsonl", ".metrics.jsonl.tmp", "tb", "samples", "captions", "final")


def _saved_steps(out: Path) -> list[int]:
    d = out / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _discard_run(out: Path) -> None:
    for name in (*RUN_ENTRIES, "checkpoints"):
        files.remove(out / name)


def _kill_hook(step: int) -> None:
    """Test hook: PID_JAX_TEST_KILL_AFTER_SAVE=<n> SIGKILLs the process right after issuing the save of step n
    (its files still being written in the background) -- the worst moment for atomicity."""
    if os.environ.get("PID_JAX_TEST_KILL_AFTER_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


# --- the run --------------------------------------------------------------------------------------


def run(opts: RunOptions, progress: Progress = print) -> dict[str, Any]:
    """Train as `opts` says; returns a summary (final step, last metrics, paths)."""
    from pid_jax.train.checkpoint import TrainCheckpointer

    # 1. Everything that can be refused is checked before building or compiling anything.
    preset = load_config(opts.config)
    if opts.batch is None:  # the default batch fills the data axis (a fixed 1 fails on a multi-device host)
        opts = dataclasses.replace(opts, batch=(opts.mesh or (jax.device_count(), 1))[0])
    stage = make_stage(opts, preset)  # refuses a setting the stage does not take (--aux-weight without the head)
    tcfg = stage.cfg
    if opts.steps < 1 or opts.batch < 1:
        raise InputError(f"--steps {opts.steps} and --batch {opts.batch} must be >= 1")
    if opts.save_every < 1:
        raise InputError(f"--save-every {opts.save_every} (expected >= 1)")
    if opts.init and not Path(opts.init).exists():  # a .pth/.safetensors file or a converted directory
        raise CheckpointError(f"--init {opts.init}: no such checkpoint file")
    n_dev = jax.device_count()
    mesh_shape = opts.mesh or (n_dev, 1)
    if opts.batch % mesh_shape[0]:
        raise InputError(f"--batch {opts.batch} is not divisible by the mesh's data axis ({mesh_shape[0]})")
    mesh = make_mesh(mesh_shape)
    n_proc, proc = jax.process_count(), jax.process_index()
    if opts.batch % n_proc:
        raise InputError(f"--batch {opts.batch} is not divisible by the number of processes ({n_proc})")
    _check_size(preset, opts.size, mesh_shape)
    h, w = opts.size
    records = data_lib.scan(opts.data)
    latent_mode = _latent_mode(preset, records, opts)
    gemma_encode = None
    texts = [r.text for r in records if r.text is not None]
    if opts.gemma or texts:  # captions the network cannot take: refused before any Gemma download
        advice = f"remove the {len(texts)} <stem>.txt caption file(s) from --data" if texts else None
        refusal = preset.caption_encoder_error("--gemma" if opts.gemma else str(texts[0]), advice)
        if refusal is not None:
            raise refusal
    if opts.gemma:
        from pid_jax.gemma.encoder import CaptionEncoder

        gemma_encode = CaptionEncoder.from_pretrained(opts.gemma, dtype=tcfg.dtype).encode
    elif any(r.text is not None for r in records):
        raise InputError(f"{next(r.text for r in records if r.text)}: a text caption needs --gemma DIR to encode it")
    cfg = preset.network
    length = data_lib.caption_length(records, min(cfg.txt_max_length, 300))
    null = data_lib.null_caption(cfg.txt_embed_dim, length, opts.null_caption, gemma_encode)
    scale = cfg.pixel_scale
    latent_shape = (cfg.lq_latent_channels, h // scale, w // scale) if latent_mode == "precomputed" else None
    spec = data_lib.DataSpec(h, w, tuple(null.shape), latent_shape, opts.alpha)
    records, skipped = data_lib.check(records, spec, opts.skip_bad)
    out = absolute(opts.out)
    ident = _identity(opts, preset, tcfg, latent_mode)
    if skipped:  # a resume must skip the same files (else its data order would differ)
        ident["skipped"] = [str(Path(f).resolve()) for f, _ in skipped]
        ident["skipped_reasons"] = [why for _, why in skipped]
    primary = proc == 0
    # One run per directory: another `train --out` of it (or a --resume while it runs) refuses in one line.
    with files.directory_lock(out, "pid-jax train") if primary else contextlib.nullcontext():
        _check_run_dir(out, ident, opts.resume)

        # 2. The network (a strict init load refuses a mismatched checkpoint here, before anything is written).
        messages: list[str] = [f"--skip-bad: {len(skipped)} bad image(s) left out:"] if skipped else []
        messages += [f"  skipped {why}" for _, why in skipped]
        graphdef, state = stage.build(messages.append, null, gemma_encode)
        encoder = _latent_encoder(latent_mode, preset, opts, tcfg)
        if n_proc > 1:  # every process has checked the run directory before process 0 writes into it
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("pid-jax train: inputs checked")

        # 3. The run directory and the state.
        out.mkdir(parents=True, exist_ok=True)
        log = _Log(progress, out / "log.txt" if primary else None)
        if primary and not opts.resume:
            _write_json_atomic(out / "run.json", ident)
        for msg in messages:
            log(msg)
        records = data_lib.encode_texts(records, gemma_encode, out / "captions")

        from pid_jax.train import shard as shard_lib

        sharded = shard_lib.resolve(opts.shard_state, state, mesh)
        state = shard_lib.place(state, shard_lib.state_shardings(state, mesh, sharded))
        ckpt = TrainCheckpointer(out, opts.save_every)
        data_pos = None
        start = 0
        if opts.resume and ckpt.latest_step() is not None:
            state, data_pos = ckpt.restore(state)
            start = int(data_pos["step"])
            log(f"resumed from step {start} ({out / 'checkpoints' / str(start)})")
        elif opts.resume:
            log("--resume: no saved step yet, starting at step 0")
        if start >= opts.steps:
            log(f"step {start} already reaches --steps {opts.steps}; nothing to train")

        # 4. Data for this process.
        loader = data_lib.SampleLoader(tuple(records), spec, null, opts.seed, tcfg.caption_drop_prob)
        dataset = data_lib.make_dataset(loader, opts.batch, proc, n_proc)
        batches = data_lib.BatchIterator(dataset, opts.workers).start(data_pos["data"] if data_pos else None)

        # 5. The compiled step.
        step_fn = stage.compile(graphdef, jax.tree.map(lambda a: a.sharding, state), mesh)
        metrics_out = _Metrics(out, start, primary)
        bar = _Progress(opts.steps, start, opts.log_every)
        sample_batch, sampler = None, None
        negative = (
            _sample_negative(preset, null, gemma_encode, log) if opts.stage == "teacher" and opts.sample_every else None
        )
        last: dict[str, Any] = {}
        log(
            f"training {preset.name} ({opts.stage}) {h}x{w}, batch {opts.batch} on mesh "
            f"{mesh_shape[0]}x{mesh_shape[1]} ({n_proc} process(es)), steps {start} -> {opts.steps}, "
            f"{latent_mode} latents, dtype {tcfg.dtype}, remat {tcfg.remat}, "
            f"train state {'sharded over the mesh' if sharded else 'replicated'}"
        )
        # A save is collective: with several processes a Ctrl-C that reaches one of them cannot save alone.
        interrupt = _Interrupt(log, enabled=n_proc == 1)
        interrupted = False
        try:
            with jax.set_mesh(mesh), interrupt:
                for step in range(start, opts.steps):
                    local = next(batches)
                    local.pop("index", None)
                    b = _global_batch(local, mesh, opts.batch)
                    if encoder is not None:
                        b["z"] = encoder(b["x0"])
                    if sample_batch is None and opts.sample_every:
                        sample_batch = {k: np.asarray(v)[:1] for k, v in local.items()} | (
                            {"z": np.asarray(_local(b["z"]))[:1]} if "z" in b else {}
                        )
                    state, m = step_fn(state, b, step)
                    m = {
                        k: (np.asarray(v).item() if not isinstance(v, str) else v)
                        for k, v in jax.device_get(_local(m)).items()
                    }
                    done = step + 1
                    m["steps_per_s"] = round(bar.update(done, m), 4)
                    metrics_out.write(done, m)
                    last = m
                    if ckpt.should_save(done) or done == opts.steps or interrupt.requested:
                        with interrupt.shield():
                            ckpt.save(done, state, {"data": batches.state()}, force=True)
                        _kill_hook(done)
                    if interrupt.requested:
                        with interrupt.shield():
                            ckpt.wait()
                        log(f"interrupted: saved step {done} in {out / 'checkpoints' / str(done)}; --resume continues")
                        interrupted = True
                        break
                    if opts.sample_every and (done % opts.sample_every == 0 or done == opts.steps):
                        whole = _local(state) if sharded else state  # a collective: every process gathers
                        if primary:
                            sampler = sampler or _Sampler(
                                lambda st: stage.ema_model(graphdef, st), preset, sample_batch, opts.stage, negative
                            )
                            sampler.write(whole, out / "samples" / f"step_{done:07d}.png", step=done)
                        del whole
            ckpt.wait()
            if opts.export and start < opts.steps and not interrupted:
                whole = _local(state) if sharded else state  # a collective: every process gathers
                if primary:
                    _export_final(stage.ema_model(graphdef, _local(whole)), preset, out / "final", log)
        except BaseException:
            if primary and not opts.resume:
                with contextlib.suppress(Exception):
                    ckpt.close()  # let a save in flight end before looking at what is saved
                if not _saved_steps(out):
                    _discard_run(out)  # nothing to resume: leave the directory as a rerun finds it
            raise
        finally:
            batches.close()
            metrics_out.close()
            ckpt.close()
        end = done if interrupted else max(start, opts.steps)
        if not interrupted:
            log(f"done: step {end}; checkpoints in {out / 'checkpoints'}")
        summary = {"step": end, "metrics": last, "out": str(out), "skipped": stage.skipped(state)}
        return {**summary, "interrupted": interrupted}


class _Sampler:
    """Decodes the run's first sample with the EMA weights (sigma 0) on this process's first device and writes
    [decoded | target] as a PNG. Compiled once per run. The distilled 4-step sampler, except for a teacher run:
    the undistilled sampler (DPM-Solver++ with guidance against `negative`), with the preset's settings, or
    upstream's teacher settings for a preset that has none."""

    def __init__(self, model_of, preset: Preset, batch: dict[str, np.ndarray], stage: str = "full", negative=None):
        from pid_jax import teacher_sampler as ts
        from pid_jax.decoder import decode, decode_teacher

        self.model_of, self.preset, self.batch = model_of, preset, batch
        _, _, h, w = batch["x0"].shape
        student = preset.sampler  # the preset's own defaults, as every decode entry point uses them
        steps = student.steps if student.kind == "student" else min(4, len(student.t_list) - 1)
        mode = student.mode if student.kind == "student" else "sde"
        sp = teacher_sampler_spec(preset) if stage == "teacher" else None
        teacher = None if sp is None else f"dpmpp {sp.steps} steps, cfg {sp.cfg_scale:g}"
        self.sampler = teacher or f"student {steps} steps {mode}"
        schedule = None if sp is None else ts.dpmpp_schedule(sp.steps, sp.shift_for(h, w))

        def run(graph, params, z, y):
            model = nnx.merge(graph, params)
            zero = jnp.zeros((z.shape[0],), jnp.float32)
            if sp is not None:
                kw = dict(height=h, width=w)
                return decode_teacher(model, z, y, negative, zero, jax.random.key(0), schedule, sp.cfg_scale, **kw)
            kw = dict(height=h, width=w, steps=steps, mode=mode, t_list=student.t_list)
            return decode(model, z, y, zero, jax.random.key(0), **kw)

        self._graph = None
        self._run = run
        self._jit = None

    def write(self, state, path: Path, step: int | None = None) -> None:
        """[decoded | target] with a caption strip over each half: the step and the weights, and "target"."""
        from pid_jax.demo import LABEL_H, side_by_side
        from pid_jax.io import write_pngs
        from pid_jax.sampler import to_uint8

        dev = jax.local_devices()[0]
        with jax.set_mesh(jax.sharding.Mesh(np.array([dev]).reshape(1, 1), (DATA, SEQ))):
            graph, params = nnx.split(self.model_of(_local(state)))
            if self._jit is None:
                self._jit = jax.jit(lambda p, z, y: self._run(graph, p, z, y))
            img = self._jit(params, jnp.asarray(self.batch["z"]), jnp.asarray(self.batch["y"]))
        decoded, target = to_uint8(np.asarray(img))[0], to_uint8(self.batch["x0"])[0]
        head = f"step {step} EMA" if step is not None else "EMA decode"
        pair = side_by_side([(decoded, head), (target, "target")], gap=0)[None]  # [1, H + strip, 2W, 3]
        settings = {"preset": self.preset.name, "weights": "ema", "layout": "decoded | target", "sampler": self.sampler}
        settings = json.dumps({**settings, "step": step, "caption_strip_px": LABEL_H})
        write_pngs(pair, [path], {"pid-jax": settings})


def teacher_sampler_spec(preset: Preset):
    """The sampler a teacher's samples use: the preset's when it is the undistilled one, else upstream's teacher
    settings (the v1.5 teachers': DPM-Solver++, 25 steps, CFG 5, dynamic shift, the negative prompt)."""
    if preset.sampler.kind == "dpmpp":
        return preset.sampler
    return load_config("flux_2kto4k_v1pt5_undistilled").sampler


def _sample_negative(preset: Preset, null: np.ndarray, encode, log) -> np.ndarray | None:
    """The unconditional caption of a teacher's sample decodes [1, L, D]: upstream's negative prompt (with the CHI
    prompt) when a caption encoder is loaded, else the run's null caption (said in the log)."""
    sp = teacher_sampler_spec(preset)
    if sp.cfg_scale == 1.0:
        return None
    if encode is not None:
        return np.asarray(encode([sp.negative_prompt]), np.float32)
    log(
        "sample decodes: no --gemma, so the guidance's unconditional branch is the null caption (upstream: the "
        "negative prompt)"
    )
    return np.asarray(null, np.float32)[None]


def _export_final(model, preset: Preset, dest: Path, log: _Log) -> None:
    from pid_jax.train.export import write_converted_dir, write_pth

    write_converted_dir(dest / "converted", model, preset, source={"trained_by": "pid-jax train"}, overwrite=True)
    write_pth(dest / "model_ema_bf16.pth", model)
    log(f"exported the EMA weights to {dest / 'converted'} and {dest / 'model_ema_bf16.pth'}")


# --- export from a run directory ---------------------------------------------------------------------


def restore_run(run_dir: str | os.PathLike, step: int | None = None):
    """(preset, graphdef, state at `step` or the latest saved step, step) of a run directory, on this host."""
    from pid_jax.train.checkpoint import TrainCheckpointer
    from pid_jax.train.init import abstract_train_net
    from pid_jax.train.state import init_train_state, split_model

    d = Path(run_dir)
    try:
        ident = json.loads((d / "run.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d}: not a pid-jax run directory ({type(e).__name__}: {e})") from None
    preset = Preset.from_dict(ident["preset"], source=str(d / "run.json"))
    if ident.get("stage") == "distill":
        from pid_jax.train.distill.stage import abstract_distill_state

        graphdef, abstract_state = abstract_distill_state(preset, ident["train"])
    else:
        tcfg = TrainConfig(**ident["train"])
        abstract = abstract_train_net(preset.network)
        graphdef, params, frozen = split_model(abstract, tcfg)

        def make(p, f):
            return init_train_state(nnx.merge(graphdef, p, f), tcfg, 0)[1]

        abstract_state = jax.eval_shape(make, params, frozen)
    ckpt = TrainCheckpointer(d, 1)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in ckpt.all_steps():
            raise CheckpointError(f"{d}: no saved step {'' if step is None else step} (saved: {ckpt.all_steps()})")
        state, _ = ckpt.restore(abstract_state, step)
    finally:
        ckpt.close()
    return preset, graphdef, state, step
