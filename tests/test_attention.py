"""Every attention implementation computes the same softmax(q k^T / sqrt(d)) v as a float64 reference."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from pid_jax.attention import attention


def _reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


# Sizes cover: tiny, uneven, the q-blocked path of "heads" (> 4096 keys) and the blocked scan.
@pytest.mark.parametrize("nq,nk", [(7, 7), (300, 556), (300, 4100), (2048, 2048)])
@pytest.mark.parametrize("impl", ["xla", "heads", "blocked", "auto"])
def test_implementations_agree(nq: int, nk: int, impl: str) -> None:
    rng = np.random.default_rng(nq + nk)
    q = rng.standard_normal((1, nq, 2, 16), dtype=np.float32) * 2
    k = rng.standard_normal((1, nk, 2, 16), dtype=np.float32) * 2
    v = rng.standard_normal((1, nk, 2, 16), dtype=np.float32)
    out = np.asarray(jax.jit(lambda a, b, c: attention(a, b, c, impl))(q, k, v))
    ref = _reference(q, k, v)
    assert out.shape == ref.shape
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-6


def test_unknown_implementation_is_refused() -> None:
    x = np.zeros((1, 4, 1, 8), np.float32)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention(x, x, x, "fast")


def test_log_sum_exp_of_the_reference() -> None:
    from pid_jax.attention import xla_with_lse

    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, n, 3, 8), dtype=np.float32) for n in (5, 9, 9))
    out, lse = xla_with_lse(q, k, v)
    s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k) / np.sqrt(8)
    want = np.log(np.exp(s).sum(-1))
    assert lse.shape == (2, 3, 5)
    np.testing.assert_allclose(np.asarray(lse), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v), atol=1e-5)


@pytest.mark.parametrize("n_prefix", [1, 7, 30])
def test_split_joint_attention_is_exact(n_prefix: int) -> None:
    """The "mgpu" path's split at the caption/image boundary, with the kernels replaced by the reference."""
    from pid_jax.attention import split_joint_attention, xla_with_lse

    rng = np.random.default_rng(n_prefix)
    q, k, v = (rng.standard_normal((2, n_prefix + 64, 3, 16), dtype=np.float32) * 2 for _ in range(3))
    # Large-magnitude scores on one side check the merge is done in a stable way.
    k[:, :n_prefix] *= 4
    out = split_joint_attention(q, k, v, n_prefix, xla_with_lse, xla_with_lse)
    ref = _reference(q, k, v)
    assert np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref) < 1e-6


def test_gpu_only_paths_fall_back_off_gpu() -> None:
    """ "mgpu" on a shape its kernel cannot take runs cuDNN; off GPU both must refuse loudly, not silently."""
    from pid_jax.attention import mgpu_fits

    assert mgpu_fits(16384, 64) and mgpu_fits(65536, 64)
    assert not mgpu_fits(16384, 72) and not mgpu_fits(16684, 64)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# Uneven lengths pad both axes (padded keys are masked); blocks smaller than the sequence exercise the scans.
@pytest.mark.parametrize(
    "nq,nk,q_block,kv_block", [(7, 7, 512, 1024), (37, 53, 8, 16), (64, 64, 16, 16), (300, 556, 128, 256)]
)
def test_flash_forward_and_gradients_match_xla(nq: int, nk: int, q_block: int, kv_block: int) -> None:
    from pid_jax.attention import _xla, flash

    rng = np.random.default_rng(nq * nk)
    q = rng.standard_normal((2, nq, 3, 16), dtype=np.float32) * 2
    k = rng.standard_normal((2, nk, 3, 16), dtype=np.float32) * 2
    v = rng.standard_normal((2, nk, 3, 16), dtype=np.float32)
    g = rng.standard_normal((2, nq, 3, 16), dtype=np.float32)

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda a, b, c: (fn(a, b, c) * g).sum(), argnums=(0, 1, 2)))

    (l_f, grads_f) = loss(lambda a, b, c: flash(a, b, c, "flash", q_block, kv_block))(q, k, v)
    (l_x, grads_x) = loss(_xla)(q, k, v)
    assert _rel(flash(q, k, v, "flash", q_block, kv_block), _xla(q, k, v)) < 1e-5
    for name, a, b in zip("qkv", grads_f, grads_x, strict=True):
        assert _rel(a, b) < 1e-5, name
    # "auto" on this backend differentiates through the same VJP (its primal forward is "heads")
    _, grads_auto = loss(lambda a, b, c: attention(a, b, c, "auto"))(q, k, v)
    for a, b in zip(grads_auto, grads_x, strict=True):
        assert _rel(a, b) < 1e-5


def test_flash_backward_memory_is_linear() -> None:
    """Structure, not time: the compiled gradient keeps no [H, N, N] probabilities (autodiff of "xla" does)."""
    from pid_jax.attention import _xla, flash

    n, h, d = 2048, 4, 16
    x = jax.ShapeDtypeStruct((1, n, h, d), jax.numpy.float32)

    def temp(fn) -> int:
        grad = jax.jit(jax.grad(lambda a, b, c: fn(a, b, c).sum(), argnums=(0, 1, 2)))
        return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    scores = h * n * n * 4
    assert temp(_xla) >= scores  # the reference keeps its probabilities for the backward pass
    assert temp(lambda a, b, c: flash(a, b, c, "flash", 256, 256)) < scores / 8
