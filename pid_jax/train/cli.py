"""`pid-jax train` and `pid-jax train-export`: registered through `pid_jax.cli.VERB_MODULES`."""

from __future__ import annotations

import argparse
from pathlib import Path

from pid_jax.cli import _pair, _progress  # one parser for AxB pairs, one progress printer
from pid_jax.errors import InputError

STAGE_HELP = (
    "teacher: train the adapter only (lq_proj.*, pit_lq_gate.*) against the frozen backbone, + aux RGB loss (0.8) "
    "when the network has the head; full: every parameter, FM loss (aux only with --aux-weight). Decides what "
    "trains whatever the config's train_lq_proj_only says; distill: upstream's DMD2 (stage C) from --teacher into a "
    "four-step student (VSD + GAN, fake score + discriminator every other iteration)"
)
DISTILL_ITERATIONS = 3000  # upstream's stage C: 3k iterations = 500 student updates


def register(sub) -> None:
    s = sub.add_parser(
        "train",
        help="train a PiD network (teacher adapter or full network) on a directory of images",
        description="Flow-matching training as upstream's (losses, AdamW, warm-up, clipping, power EMA), resumable "
        "and data parallel. Writes RUN_DIR/{run.json, checkpoints/, metrics.jsonl, tb/, samples/, log.txt, final/}; "
        "one run at a time per RUN_DIR (locked). Ctrl-C saves the current step and exits (130); a second Ctrl-C "
        "aborts.",
    )
    g = s.add_argument_group("run")
    g.add_argument("--config", required=True, help="preset name or JSON (preset, or upstream PidNet arguments)")
    g.add_argument(
        "--data",
        required=True,
        help="directory of *.png/*.jpg, each with optional <stem>.npy (caption embedding [L, D]), <stem>.txt "
        "(caption, needs --gemma) and <stem>.latent.npy (LQ latent of the whole image: no random crop)",
    )
    g.add_argument(
        "--alpha",
        choices=("refuse", "white", "black"),
        default="refuse",
        help="transparent images: refuse them, or composite over white / black (as upscale); opaque alpha is dropped",
    )
    g.add_argument(
        "--skip-bad",
        action="store_true",
        help="train without the images that fail the up-front check (every image is decoded before anything is "
        "written; without this flag any bad one refuses the run, all listed); the skipped ones go to log.txt and "
        "run.json",
    )
    g.add_argument("--stage", choices=("teacher", "full", "distill"), default="teacher", help=STAGE_HELP)
    g.add_argument(
        "--steps", type=int, help="train until this many steps (distill: iterations) in total; required, distill 3000"
    )
    g.add_argument(
        "--batch",
        type=int,
        help="global batch, divisible by the mesh's data axis (default: the data axis size, i.e. one image per device)",
    )
    g.add_argument("--size", type=_pair("HxW", "256x256"), default=(256, 256), help="training crop size HxW")
    g.add_argument("--out", required=True, help="run directory (must not hold a run unless --resume)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest saved step")
    g.add_argument("--seed", type=int, default=0, help="seed of the init, data order, crops, dropout and draws")
    g = s.add_argument_group("weights and conditioning")
    g.add_argument(
        "--init",
        help="init checkpoint (.pth/.safetensors, or a converted directory), loaded strictly; for --stage "
        "teacher the adapter keys may be missing (initialised as upstream, listed in log.txt). Without it the "
        "whole network starts from upstream's init",
    )
    g.add_argument("--gemma", help="Gemma-2 directory or repo id: encodes <stem>.txt captions and the null caption")
    g.add_argument(
        "--null-caption",
        help="embedding [L, D] (.npy) used for dropped captions (10%%) and images without one; default: Gemma's "
        "encoding of the empty caption with --gemma, zeros for networks without the Gemma caption stream",
    )
    g.add_argument("--vae", help="VAE weights that encode the LQ images into latents (pid_jax.vae)")
    g.add_argument("--vae-kind", help="VAE kind (flux, sd3, sdxl, flux2, qwenimage); default from the preset")
    g.add_argument("--teacher", help="distill: the undistilled teacher (.pth/.safetensors; its EMA when it has one)")
    g.add_argument(
        "--negative-caption",
        help="distill: embedding [L, D] (.npy) of the negative prompt, the teacher's CFG null (default: Gemma's "
        "encoding of upstream's negative prompt with --gemma, else the null caption)",
    )
    g = s.add_argument_group("optimisation (defaults: upstream's for the stage)")
    g.add_argument("--lr", type=float, help="AdamW learning rate (teacher 5e-5, full 1e-5; distill: student 1e-5)")
    g.add_argument(
        "--weight-decay", type=float, help="decoupled weight decay on every trained tensor (1e-3 / 0; distill 0)"
    )
    g.add_argument("--warmup", type=int, help="linear warm-up steps, then constant (2000; distill: 100 student steps)")
    g.add_argument("--aux-weight", type=float, help="aux RGB loss weight (teacher with the head: 0.8, else 0)")
    g.add_argument("--clip-norm", type=float, help="global gradient-norm clip (0.1)")
    g.add_argument(
        "--lr-f-min",
        type=float,
        help="after the warm-up, the rate falls linearly to lr * F at --lr-cycle-steps (upstream LambdaLinear f_min; "
        "default 1: constant)",
    )
    g.add_argument("--lr-cycle-steps", type=int, help="the step where the linear fall reaches --lr-f-min")
    g.add_argument("--ema-sigma-rel", type=float, help="power-EMA width relative to the run's length (0.1)")
    g = s.add_argument_group("distillation (--stage distill; defaults: upstream's stage C)")
    g.add_argument("--eps", type=float, help="the student's AdamW eps (1e-8)")
    g.add_argument("--fake-lr", type=float, help="fake score AdamW learning rate, constant (1e-5)")
    g.add_argument("--fake-weight-decay", type=float, help="fake score weight decay (1e-3)")
    g.add_argument("--fake-eps", type=float, help="fake score AdamW eps (1e-8)")
    g.add_argument("--disc-lr", type=float, help="discriminator AdamW learning rate, constant (1e-5)")
    g.add_argument("--disc-weight-decay", type=float, help="discriminator weight decay (0)")
    g.add_argument("--disc-eps", type=float, help="discriminator AdamW eps (1e-8)")
    g.add_argument("--student-update-freq", type=int, help="iteration it %% N == 0 updates the student (6)")
    g.add_argument("--cfg-scale", type=float, help="the teacher's guidance against the negative prompt (3)")
    g.add_argument("--vsd-weight", type=float, help="VSD loss weight (1)")
    g.add_argument("--dsm-weight", type=float, help="fake score DSM loss weight (1)")
    g.add_argument("--gan-weight", type=float, help="generator GAN weight (0.05; 0 turns the GAN off)")
    g.add_argument("--gan-warmup", type=int, help="GAN weight warm-up in iterations (100)")
    g.add_argument("--r1-weight", type=float, help="approximate R1 weight (200)")
    g.add_argument("--r1-alpha", type=float, help="approximate R1 noise scale (0.1)")
    g.add_argument(
        "--feature-index", type=int, help="patch block the discriminator reads (default: the middle one, 7 of 14)"
    )
    g.add_argument(
        "--t-list",
        type=lambda v: tuple(float(x) for x in v.split(",")),
        help="teacher-forcing times, comma separated; the student input uses all but the last "
        "(0.999,0.866,0.634,0.342,0.0)",
    )
    g.add_argument("--t-min", type=float, help="DMD time clamp, lower end (0.02)")
    g.add_argument("--t-max", type=float, help="DMD time clamp, upper end (0.99)")
    g.add_argument(
        "--exact-dtype",
        choices=("float64", "float32"),
        help="dtype of what upstream computes in float64 (v -> x0, VSD); float32 for devices without float64",
    )
    g = s.add_argument_group("noise and conditioning draws (defaults: upstream's teacher)")
    g.add_argument("--shift", type=float, help="fixed timestep shift (default: dynamic, 6 * sqrt(sqrt(HW) / 2048))")
    g.add_argument("--t-mean", type=float, help="mean of the logit-normal timestep draw (0)")
    g.add_argument("--t-std", type=float, help="std of the logit-normal timestep draw (1)")
    g.add_argument("--apply-prob", type=float, help="probability that the LQ latent is noised (0.75)")
    g.add_argument("--sigma-max", type=float, help="largest LQ-latent noise level, drawn uniformly from 0 (0.8)")
    g.add_argument("--lq-drop-prob", type=float, help="probability that the whole LQ latent is dropped (0.1)")
    g.add_argument("--caption-drop-prob", type=float, help="probability that a caption becomes the null one (0.1)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype (weights f32)")
    g.add_argument(
        "--remat",
        nargs="?",
        const="full",
        metavar="PLAN",
        help="rematerialise blocks in the backward pass: full (nothing inside a block saved; bare --remat), dots "
        "(only the Linear outputs saved), off, or per block group/slice, e.g. patch=dots,pixel=full or "
        "all=full,patch[10:]=dots (less memory for more compute)",
    )
    g = s.add_argument_group("devices and processes")
    g.add_argument("--mesh", type=_pair("DxS (data x sequence)", "4x1"), help="device mesh (default: all x 1)")
    g.add_argument("--attn", default="auto", help="attention implementation: auto, xla, flash, heads, cudnn")
    g.add_argument(
        "--shard-state",
        choices=("auto", "on", "off"),
        default="auto",
        help="split the train state (parameters, AdamW moments, EMA) over the mesh's devices instead of replicating "
        "it (auto: when the replicated state and its gradients would take over half of one device's memory)",
    )
    g.add_argument("--coordinator", help="HOST:PORT of process 0 for multi-process runs (jax.distributed)")
    g.add_argument("--num-processes", type=int, help="number of processes (with --coordinator)")
    g.add_argument("--process-id", type=int, help="this process's index (with --coordinator)")
    g = s.add_argument_group("outputs")
    g.add_argument("--save-every", type=int, default=500, help="save the train state every N steps (and at the end)")
    g.add_argument("--sample-every", type=int, default=0, help="decode a sample PNG every N steps (0: never)")
    g.add_argument("--log-every", type=int, default=10, help="progress line every N steps when not on a terminal")
    g.add_argument("--workers", type=int, default=0, help="grain worker processes for image loading (0: in-process)")
    g.add_argument("--no-export", action="store_true", help="do not export the EMA weights to RUN_DIR/final/")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser(
        "train-export",
        help="export a run's EMA (or raw) weights: converted directory and/or released-layout .pth",
    )
    s.add_argument("run_dir", help="the run directory (--out of pid-jax train)")
    s.add_argument("--step", type=int, help="saved step to export (default: the latest)")
    s.add_argument("--raw", action="store_true", help="the trained weights instead of their EMA")
    s.add_argument("--out", help="converted directory (loads with PiDDecoder.from_checkpoint and pid-jax decode)")
    s.add_argument("--pth", help="model_ema_bf16.pth in the released layout (net.* keys, bfloat16)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out directory or --pth file")
    s.set_defaults(fn=cmd_train_export)


def _distributed(args: argparse.Namespace) -> None:
    given = [args.coordinator is not None, args.num_processes is not None, args.process_id is not None]
    if not any(given):
        return
    if not all(given):
        raise InputError("--coordinator, --num-processes and --process-id go together")
    if not 0 <= args.process_id < args.num_processes:
        raise InputError(f"--process-id {args.process_id} outside [0, {args.num_processes})")
    import jax

    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


FLOW_ONLY = ("aux_weight", "shift", "lr_f_min", "lr_cycle_steps")
DISTILL_ONLY = (
    "eps", "fake_lr", "fake_weight_decay", "fake_eps", "disc_lr", "disc_weight_decay", "disc_eps",
    "student_update_freq", "cfg_scale", "vsd_weight", "dsm_weight", "gan_weight", "gan_warmup", "r1_weight",
    "r1_alpha", "feature_index", "t_list", "t_min", "t_max", "exact_dtype",
)  # fmt: skip
# The shared flags' names in DistillConfig.
DISTILL_NAMES = {"lr": "student_lr", "weight_decay": "student_weight_decay", "eps": "student_eps"}


def _distill_overrides(args: argparse.Namespace, shared: dict) -> dict:
    bad = [k for k in FLOW_ONLY if shared.get(k) is not None]
    if bad:
        raise InputError(f"--stage distill has no {', '.join('--' + k.replace('_', '-') for k in bad)}")
    out = {DISTILL_NAMES.get(k, k): v for k, v in shared.items() if k not in FLOW_ONLY}
    for k in DISTILL_ONLY:
        out[DISTILL_NAMES.get(k, k)] = getattr(args, k)
    return {k: v for k, v in out.items() if v is not None}


def cmd_train(args: argparse.Namespace) -> int:
    _distributed(args)
    from pid_jax.train.loop import RunOptions, run

    if args.stage != "distill":
        given = [k for k in DISTILL_ONLY if getattr(args, k) is not None]
        given += [k for k in ("teacher", "negative_caption") if getattr(args, k) is not None]
        if given:
            raise InputError(f"{', '.join('--' + k.replace('_', '-') for k in given)}: only with --stage distill")
        if args.steps is None:
            raise InputError("--steps N is required (train until N steps in total)")
    steps = args.steps if args.steps is not None else DISTILL_ITERATIONS
    overrides = {
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup_steps": args.warmup,
        "aux_weight": args.aux_weight,
        "clip_norm": args.clip_norm,
        "dtype": args.dtype,
        "remat": args.remat,
        "lr_f_min": args.lr_f_min,
        "lr_cycle_steps": args.lr_cycle_steps,
        "ema_sigma_rel": args.ema_sigma_rel,
        "shift": args.shift,
        "t_mean": args.t_mean,
        "t_std": args.t_std,
        "apply_prob": args.apply_prob,
        "sigma_max": args.sigma_max,
        "lq_drop_prob": args.lq_drop_prob,
        "caption_drop_prob": args.caption_drop_prob,
    }
    opts = RunOptions(
        config=args.config,
        data=args.data,
        out=args.out,
        stage=args.stage,
        steps=steps,
        batch=args.batch,
        size=args.size,
        init=args.init,
        gemma=args.gemma,
        null_caption=args.null_caption,
        vae=args.vae,
        vae_kind=args.vae_kind,
        alpha=args.alpha,
        seed=args.seed,
        mesh=args.mesh,
        save_every=args.save_every,
        sample_every=args.sample_every,
        log_every=args.log_every,
        workers=args.workers,
        resume=args.resume,
        skip_bad=args.skip_bad,
        export=not args.no_export,
        attn=args.attn,
        train_overrides=(
            _distill_overrides(args, overrides)
            if args.stage == "distill"
            else {k: v for k, v in overrides.items() if v is not None}
        ),
        teacher=args.teacher,
        negative_caption=args.negative_caption,
        shard_state=args.shard_state,
    )
    result = run(opts, progress=_progress)
    m = result["metrics"]
    loss = f", loss {m['loss']:.5f}" if m else ""
    if result.get("interrupted"):  # the first Ctrl-C: saved, ended cleanly; 130 as an interrupted command
        print(f"interrupted at step {result['step']} (saved){loss}; continue with --resume; run in {result['out']}")
        return 130
    print(f"trained to step {result['step']}{loss}; run in {result['out']}")
    return 0


def cmd_train_export(args: argparse.Namespace) -> int:
    if not args.out and not args.pth:
        raise InputError("train-export needs --out DIR and/or --pth FILE")
    if args.pth and Path(args.pth).exists() and not args.overwrite:
        raise InputError(f"--pth {args.pth} already exists (pass --overwrite to replace it)")
    from pid_jax.train.distill.state import DistillState, student_model
    from pid_jax.train.export import write_converted_dir, write_pth
    from pid_jax.train.loop import _local, restore_run
    from pid_jax.train.state import merged_model

    preset, graphdef, state, step = restore_run(args.run_dir, args.step)
    if isinstance(state, DistillState):  # a distillation run exports its student
        model = student_model(graphdef, _local(state), use_ema=not args.raw)
    else:
        model = merged_model(graphdef, _local(state), use_ema=not args.raw)
    what = "raw" if args.raw else "EMA"
    if args.out:
        src = {"run": str(args.run_dir), "step": step, "weights": what}
        print(f"wrote {write_converted_dir(args.out, model, preset, source=src, overwrite=args.overwrite)}")
    if args.pth:
        print(f"wrote {write_pth(args.pth, model)}")
    _progress(f"exported the {what} weights of step {step}")
    return 0
