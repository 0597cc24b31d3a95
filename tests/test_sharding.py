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
