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
