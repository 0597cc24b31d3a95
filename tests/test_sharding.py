"""Several devices on the CPU: the mesh runs must match one device within the float32 parity bound.

XLA fixes the device count when JAX starts, so the check runs in a subprocess with
--xla_force_host_platform_device_count=4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import FIXTURES, fixture

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from pid_jax.weights import load_model
    from pid_jax.parity import forward_parity, sampler_parity
    from pid_jax.decoder import PiDDecoder

    fx = sys.argv[1]
    pth, cfg = fx + "/pidnet/v1pt5_flux/model_ema_bf16.pth", fx + "/pidnet/v1pt5_flux/config.json"
    out = {"devices": len(jax.devices())}
    _, model = load_model(pth, cfg)
    for mesh in ([1, 4], [2, 2], [2, 1]):
        rows = forward_parity(model, fx + "/pidnet/v1pt5_flux/io.npz", mesh=tuple(mesh))
        out["forward_%dx%d" % tuple(mesh)] = max(r.rel_l2 for r in rows)
    rows = sampler_parity(model, fx + "/sampler/v1pt5_flux_4step.npz", mesh=(2, 2))
    out["sampler_2x2"] = max(r.rel_l2 for r in rows)
    io = np.load(fx + "/pidnet/v1pt5_flux/io.npz")
    dec = PiDDecoder.from_checkpoint(pth, cfg, dtype="float32")
    one = np.asarray(dec.decode_array(io["in.lq_latent"], io["in.y"], sigma=[0.0, 0.4], seed=3))
    dec.set_mesh((1, 4))
    sharded = dec.decode_array(io["in.lq_latent"], io["in.y"], sigma=[0.0, 0.4], seed=3)
    out["decode_spec"] = str(sharded.sharding.spec)
    out["decode_1x4"] = float(np.linalg.norm(np.asarray(sharded) - one) / np.linalg.norm(one))
    odd = io["in.lq_latent"].shape[2] - 1 | 1  # an odd number of latent rows: 2 * odd patch rows over 4 shards
    try:
        dec.decode_array(io["in.lq_latent"][:, :, :odd], io["in.y"])
    except Exception as e:
        out["indivisible"] = type(e).__name__ + ": " + str(e)
    print(json.dumps(out))
    """
)


def test_mesh_matches_single_device(tmp_path: Path) -> None:
    fixture("pidnet", "v1pt5_flux", "io.npz")
    fixture("sampler", "v1pt5_flux_4step.npz")
    # Backend optimisation level 0: compile time dominates here; the runs are compared, not timed.
    flags = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(FIXTURES)], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["devices"] == 4
    for k in ("forward_1x4", "forward_2x2", "forward_2x1"):
        assert res[k] <= 1e-4, (k, res[k])
    assert res["sampler_2x2"] <= 5e-4
    assert res["decode_1x4"] <= 1e-4
    assert "seq" in res["decode_spec"], res["decode_spec"]  # the image really is split over devices
    assert "InputError" in res["indivisible"] and "not divisible" in res["indivisible"], res.get("indivisible")


USER_MESH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from pid_jax.decoder import PiDDecoder, decode
    from pid_jax.sharding import pid_mesh, replicate

    fx = sys.argv[1]
    pth, cfg = fx + "/pidnet/v1pt5_flux/model_ema_bf16.pth", fx + "/pidnet/v1pt5_flux/config.json"
    io = np.load(fx + "/pidnet/v1pt5_flux/io.npz")
    z, y = np.concatenate([io["in.lq_latent"]] * 2), np.concatenate([io["in.y"]] * 2)  # batch 4
    dec = PiDDecoder.from_checkpoint(pth, cfg, dtype="float32")
    one = np.asarray(dec.decode_array(z, y, seed=3, steps=2))
    out = {}

    def run(name, mesh, **kw):
        try:
            dec.set_mesh(mesh, **kw)
            got = dec.decode_array(z, y, seed=3, steps=2)
            out[name] = [str(got.sharding.spec), float(np.linalg.norm(np.asarray(got) - one) / np.linalg.norm(one))]
        except Exception as e:
            out[name] = type(e).__name__ + ": " + str(e)

    explicit = jax.make_mesh((4, 1), ("data", "seq"))  # JAX's default axis type now: Explicit
    out["axis_types"] = [t.name for t in explicit.axis_types]
    run("make_mesh_4x1", explicit)
    run("make_mesh_2x2", jax.make_mesh((2, 2), ("data", "seq")))
    named = jax.make_mesh((2, 2), ("batch", "sp"))
    run("named_default", named)
    run("named", named, batch_axis="batch", seq_axis="sp")
    run("batch_only", jax.make_mesh((4,), ("dp",)), batch_axis="dp", seq_axis=None)
    run("extra_axis", jax.make_mesh((2, 2), ("dp", "tp")), batch_axis="dp", seq_axis=None)
    # The functional core inside the caller's own jit under their mesh: refused in one line for an Explicit
    # mesh, and sharded as PiDDecoder's under pid_mesh(...) of it.
    graphdef, params = dec.graphdef, dec.params
    kw = dict(height=one.shape[2], width=one.shape[3], steps=2)
    f = jax.jit(lambda p, z, y, s, k: decode(nnx.merge(graphdef, p), z, y, s, k, **kw))
    s0 = np.zeros(4, np.float32)
    try:
        with jax.set_mesh(named):
            f(params, z, y, s0, jax.random.key(3))
    except Exception as e:
        out["functional_explicit"] = type(e).__name__ + ": " + str(e)
    mesh = pid_mesh(named, batch_axis="batch", seq_axis="sp")
    with jax.set_mesh(mesh):
        got = f(replicate(params, mesh), z, y, s0, jax.random.key(3))
    out["functional_pid_mesh"] = float(np.linalg.norm(np.asarray(got) - one) / np.linalg.norm(one))
    print(json.dumps(out))
    """
)


def test_meshes_users_bring(tmp_path: Path) -> None:
    """Issue 18, item 3: `jax.make_mesh` meshes (Explicit axes) and meshes with other axis names."""
    fixture("pidnet", "v1pt5_flux", "io.npz")
    flags = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", USER_MESH_SCRIPT, str(FIXTURES)], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["axis_types"] == ["Explicit", "Explicit"]
    for k in ("make_mesh_4x1", "make_mesh_2x2", "named", "batch_only"):
        assert isinstance(res[k], list), (k, res[k])
        assert res[k][1] <= 1e-4, (k, res[k])
    assert "'data'" in res["make_mesh_4x1"][0] and "'seq'" in res["make_mesh_2x2"][0]
    assert res["named_default"] == (
        "InputError: the mesh has no axis 'data' (batch_axis); its axes are ('batch', 'sp'): name them with "
        "batch_axis=... and seq_axis=... (None: not split)"
    )
    assert res["extra_axis"].startswith("InputError: mesh axis 'tp' (size 2) is neither batch_axis nor seq_axis")
    assert res["functional_explicit"].startswith("InputError: the current mesh has axes ('batch' Explicit")
    assert "pid_mesh(mesh, batch_axis=..., seq_axis=...)" in res["functional_explicit"]
    assert res["functional_pid_mesh"] <= 1e-4
