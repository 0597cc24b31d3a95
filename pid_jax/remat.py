"""Rematerialisation of the network's blocks that holds on every backend, with per-block policies.

Why `jax.checkpoint` alone saved nothing: JAX marks the recomputation's inputs with an `optimization_barrier`
(prevent_cse) so XLA neither merges the recomputed forward with the original (CSE) nor schedules it early.
XLA:CPU removes every barrier at the start of its pipeline (its `cse_barrier_expander` pass, before layout
assignment), so afterwards the recomputation is an ordinary copy of the forward that depends on nothing of
the backward pass: CSE folds it into the forward or the scheduler runs it during the forward, and the
block's activations are live for the whole backward pass either way (measured: temporaries grew).

Here the block is a `jax.custom_vjp`: the forward runs `jax.checkpoint(block, policy)` under `jax.vjp`,
which keeps only what the policy saves (and the block's inputs); the backward first passes those residuals
through a select on a predicate computed from the incoming cotangent (always true, but XLA cannot know).
The recomputation then data-depends on the cotangent, so it cannot run before the backward pass reaches
the block, and its inputs are not the forward's values, so nothing is merged with the forward.

Policies: "off" (no remat), "full" (nothing inside the block saved: its whole forward is recomputed),
"dots" (only the outputs of matmuls without batch dimensions, i.e. the Linear layers, are saved; norms,
activations and the attention are recomputed).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pid_jax.errors import ConfigError

_cp = jax.checkpoint_policies
POLICIES = {
    "full": _cp.nothing_saveable,
    # Linear outputs: plain dots in float32, and the half-precision matmul (a custom VJP the dot policy cannot
    # see into) by its checkpoint name.
    "dots": _cp.save_from_both_policies(_cp.dots_with_no_batch_dims_saveable, _cp.save_only_these_names("linear")),
}
NAMES = ("off", *POLICIES)
GROUPS = ("patch", "pixel")

_ENTRY = re.compile(r"^(all|patch|pixel)(?:\[(-?\d*)(?::(-?\d*))?\])?=(\w+)$")


def parse_plan(plan: str | bool | None, patch_depth: int, pixel_depth: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The policy of every patch block and every pixel block.

    `plan` is a policy name for every block ("off", "full", "dots"; True means "full") or comma-separated
    `GROUP[SLICE]=POLICY` entries applied in order, GROUP one of all/patch/pixel and SLICE a Python index or
    slice over that group's blocks, e.g. "patch=dots,pixel=full" or "all=full,patch[10:]=dots"."""
    if plan is None or plan is False:
        plan = "off"
    if plan is True:
        plan = "full"
    depth = {"patch": patch_depth, "pixel": pixel_depth}
    out = {"patch": ["off"] * patch_depth, "pixel": ["off"] * pixel_depth}
    text = str(plan).strip()
    if text in NAMES:
        return (text,) * patch_depth, (text,) * pixel_depth
    for entry in text.split(","):
        m = _ENTRY.match(entry.strip())
        if not m or m.group(4) not in NAMES:
            raise ConfigError(
                f"remat plan {plan!r}: cannot read {entry.strip()!r}; expected a policy ({', '.join(NAMES)}) or "
                "entries GROUP[SLICE]=POLICY with GROUP all, patch or pixel (e.g. 'patch=dots,pixel=full')"
            )
        group, start, stop, policy = m.groups()
        for g in GROUPS if group == "all" else (group,):
            n = depth[g]
            if start is None:
                idx = range(n)
            elif stop is None and ":" not in entry:
                i = int(start)
                if not -n <= i < n:
                    raise ConfigError(f"remat plan {plan!r}: {g} block {i} out of range (the network has {n})")
                idx = [i % n]
            else:
                idx = range(n)[slice(int(start) if start else None, int(stop) if stop else None)]
            for i in idx:
                out[g][i] = policy
    return tuple(out["patch"]), tuple(out["pixel"])


def normalise(plan: str | bool | None) -> str:
    """A plan as stored in the train config (a string), checked against a nominal depth."""
    if plan is None or plan is False:
        return "off"
    if plan is True:
        return "full"
    parse_plan(plan, 64, 64)
    return str(plan).strip()


def _always_true(ct) -> jax.Array:
    """A scalar True that XLA cannot prove: derived from the cotangent (x < -inf is false for every float)."""
    leaves = [a for a in jax.tree.leaves(ct) if hasattr(a, "dtype") and a.size]
    if not leaves:
        return jnp.asarray(True)
    first = leaves[0].reshape(-1)[0]
    if not jnp.issubdtype(first.dtype, jnp.floating):
        return jnp.asarray(True)
    return jnp.logical_not(first < -jnp.inf)


def _hide(tree, keep: jax.Array):
    """The residuals behind a select XLA cannot fold: values unchanged, but no longer the forward's values."""

    def one(a):
        if not hasattr(a, "dtype") or not a.size:
            return a
        return jnp.where(keep, a, jnp.zeros((), a.dtype))

    return jax.tree.map(one, tree)


def checkpoint(fn: Callable, policy: str) -> Callable:
    """`fn(*args)` (array pytrees only) rematerialised under `policy` ("off" returns fn itself)."""
    if policy == "off":
        return fn
    if policy not in POLICIES:
        raise ConfigError(f"remat policy {policy!r} (expected one of {NAMES})")
    ck = jax.checkpoint(fn, policy=POLICIES[policy], prevent_cse=False)

    @jax.custom_vjp
    def run(*args):
        return fn(*args)

    def fwd(*args):
        out, pullback = jax.vjp(ck, *args)
        return out, pullback

    def bwd(pullback, ct):
        return _hide(pullback, _always_true(ct))(ct)

    run.defvjp(fwd, bwd)
    return run
