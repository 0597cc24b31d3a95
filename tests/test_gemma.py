"""Gemma-2 caption encoder: config, parity with transformers, checkpoint strictness, prompt construction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tokenizers
from conftest import fixture
from flax import nnx
from pid_jax.convert.gemma import (
    SKIPPED,
    abstract_gemma_state,
    gemma_expected_keys,
    load_gemma_model,
    load_gemma_params,
    map_key,
)
from safetensors import safe_open
from safetensors.numpy import save_file

from pid_jax.errors import CheckpointError, ConfigError, InputError
from pid_jax.gemma import CaptionEncoder, CaptionTokenizer, GemmaConfig, build_prompt_batch, load_chi_prompt
from pid_jax.gemma.modeling import Gemma2Attention, make_forward
from pid_jax.gemma.parity import gemma_parity
from pid_jax.gemma.prompt import keep_positions


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    fixture("gemma2", "config.json")
    fixture("gemma2", "model.safetensors")
    return fixture("gemma2")


@pytest.fixture(scope="module")
def cfg(gemma_dir: Path) -> GemmaConfig:
    return GemmaConfig.from_json(gemma_dir / "config.json")


def _fixture_tensors(gemma_dir: Path) -> dict[str, np.ndarray]:
    with safe_open(str(gemma_dir / "model.safetensors"), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ----------------------------------------------------------------------------------------------- config


def test_config_from_fixture(cfg: GemmaConfig) -> None:
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.sliding_window) == (64, 4, 16, 16)
    assert cfg.rope_theta == 10000.0  # from transformers 5's rope_parameters
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2
    assert cfg.attn_logit_softcapping == 50.0 and cfg.query_pre_attn_scalar == 16


def test_config_defaults_and_rejections(gemma_dir: Path) -> None:
    d = json.loads((gemma_dir / "config.json").read_text())
    d.pop("layer_types")
    d.pop("rope_parameters")
    d["num_hidden_layers"] = 5
    d["rope_theta"] = 5000.0  # transformers 4.x layout
    c = GemmaConfig.from_dict(d)
    # transformers' default pattern: layer 0 sliding, then alternating.
    assert c.layer_types == ("sliding_attention", "full_attention") * 2 + ("sliding_attention",)
    assert c.rope_theta == 5000.0
    for change in (
        {"hidden_activation": "gelu"},
        {"attention_bias": True},
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
        {"layer_types": ["sliding_attention"] * 3},
        {"layer_types": ["chunked_attention"] * 5},
        {"num_key_value_heads": 3},
        {"model_type": "llama"},
        {"sliding_window": None},
    ):
        with pytest.raises(ConfigError):
            GemmaConfig.from_dict({**d, **change})


# ----------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_parity_with_transformers(gemma_dir: Path, dtype: str, tol: float) -> None:
    rows = gemma_parity(gemma_dir, fixture("gemma2", "io.npz"), dtype)
    with np.load(fixture("gemma2", "io.npz")) as z:
        assert z["attention_mask"].min() == 0  # the fixture does exercise right padding
        b = z["input_ids"].shape[0]
    assert [r[0] for r in rows] == ["last_hidden_state"] + [f"last_hidden_state[{i}]" for i in range(b)]
    for name, _, rel, max_abs in rows:
        assert np.isfinite(max_abs)
        assert rel <= tol, f"{dtype} {name}: rel L2 {rel:.3e} > {tol}"


def test_fully_masked_query_row_is_uniform_not_nan(gemma_dir: Path, cfg: GemmaConfig) -> None:
    # transformers adds finfo.min to every score of such a row, so softmax is uniform over all keys.
    @jax.jit
    def run(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        attn = Gemma2Attention(cfg, rngs=nnx.Rngs(1), param_dtype=jnp.float32, dtype=jnp.float32)
        cos, sin = jnp.ones((5, cfg.head_dim)), jnp.zeros((5, cfg.head_dim))
        allowed = jnp.tril(jnp.ones((5, 5), bool))[None].at[0, 4].set(False)
        v = attn.v_proj(x).reshape(1, 5, cfg.num_key_value_heads, cfg.head_dim).mean(axis=1)  # [1, kv, d]
        v = jnp.repeat(v, cfg.num_kv_groups, axis=1).reshape(1, -1)
        return attn(x, cos, sin, allowed), attn.o_proj(v)

    out, uniform = run(jax.random.normal(jax.random.key(0), (1, 5, cfg.hidden_size)))
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(np.asarray(out[0, 4]), np.asarray(uniform[0]), rtol=1e-5, atol=1e-6)

    # End to end: a sliding window of 2 and long right padding leaves padded queries with no key at all.
    small = GemmaConfig.from_dict({**cfg.to_dict(), "sliding_window": 2, "model_type": "gemma2"})
    graphdef, state = nnx.split(load_gemma_model(gemma_dir, small, "float32"))
    ids = jnp.array([[2, 5, 6, 0, 0, 0, 0, 0]], jnp.int32)
    assert bool(jnp.isfinite(make_forward(graphdef)(state, ids, (ids != 0).astype(jnp.int32))).all())


# ------------------------------------------------------------------------------------- checkpoint mapping


def test_full_size_manifest_maps_one_to_one() -> None:
    manifest = json.loads(fixture("manifests", "gemma-2-2b-it.json").read_text())
    cfg = GemmaConfig.from_dict(manifest["config"])
    files = {k: tuple(v) for k, v in manifest["state_dict"].items()}
    expected = gemma_expected_keys(cfg)
    skipped = {k: v for k, v in files.items() if k in SKIPPED}
    assert set(skipped) == {"lm_head.weight"} and skipped["lm_head.weight"] == (256000, 2304)
    assert {k: v for k, v in files.items() if k not in SKIPPED} == expected
    assert len(expected) == 2 + 11 * 26
    # Shape evaluation only: every leaf is abstract.
    leaves = jax.tree_util.tree_leaves(abstract_gemma_state(cfg, "bfloat16"))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == 2_614_341_888


def test_key_table() -> None:
    assert map_key("model.layers.12.self_attn.o_proj.weight") == "layers.12.self_attn.o_proj.weight"
    assert map_key("layers.3.post_feedforward_layernorm.weight") == "layers.3.post_feedforward_layernorm.weight"
    assert map_key("model.norm.weight") == "norm.weight"
    assert map_key("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert map_key("model.layers.0.self_attn.q_proj.bias") is None


def test_loader_rejects_renamed_and_reshaped_keys(tmp_path: Path, gemma_dir: Path, cfg: GemmaConfig) -> None:
    sd = {k: v.astype(np.float32) for k, v in _fixture_tensors(gemma_dir).items()}
    sd["model.layers.1.mlp.gate_projection.weight"] = sd.pop("model.layers.1.mlp.gate_proj.weight")
    sd["model.layers.2.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_gemma_params(tmp_path, cfg)
    msg = str(e.value)
    assert "model.layers.2.self_attn.k_proj.weight: file (16, 64) vs network (32, 64)" in msg
    assert "missing key(s) [model.layers.1.mlp.gate_proj.weight]" in msg
    assert "unexpected key(s) [model.layers.1.mlp.gate_projection.weight]" in msg


def test_loader_variants_agree(tmp_path: Path, gemma_dir: Path, cfg: GemmaConfig) -> None:
    sd = _fixture_tensors(gemma_dir)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in sd.values())  # read as ml_dtypes bf16
    ref = load_gemma_params(gemma_dir, cfg)

    # Sharded, without the `model.` prefix, with a tied lm_head (knowingly skipped).
    bare = {k.removeprefix("model."): v for k, v in sd.items()}
    bare["lm_head.weight"] = bare["embed_tokens.weight"]
    names = sorted(bare)
    shards = {"model-00001-of-00002.safetensors": names[:20], "model-00002-of-00002.safetensors": names[20:]}
    for fname, keys in shards.items():
        save_file({k: bare[k] for k in keys}, str(tmp_path / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    got = load_gemma_params(tmp_path, cfg)
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # An index that promises a tensor the shard lacks is an error, as is a wrong lm_head.
    index["weight_map"]["norm.extra"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="norm.extra"):
        load_gemma_params(tmp_path, cfg)
    single = tmp_path / "single.safetensors"
    save_file({**sd, "lm_head.weight": np.zeros((3, 64), ml_dtypes.bfloat16)}, str(single))
    with pytest.raises(CheckpointError, match=r"lm_head.weight: file \(3, 64\)"):
        load_gemma_params(single, cfg)
    # Both spellings of one key at once is ambiguous.
    dup = tmp_path / "dup.safetensors"
    save_file({**sd, "norm.weight": sd["model.norm.weight"]}, str(dup))
    with pytest.raises(CheckpointError, match="given twice"):
        load_gemma_params(dup, cfg)


# ------------------------------------------------------------------------------------------------ prompt

WORDS = ["a", "b", "c", "d", "e", "f", "User", "Prompt:"]


def tiny_tokenizer_json(path: Path) -> Path:
    """WordLevel tokenizer with Gemma's special-token ids; its own post-processor also adds <bos>."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3} | {w: 4 + i for i, w in enumerate(WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>"])
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.enable_padding(pad_id=0, pad_token="<pad>", length=7)  # must be ignored by CaptionTokenizer
    tok.save(str(path))
    return path


@pytest.fixture
def tiny_tok(tmp_path: Path) -> CaptionTokenizer:
    return CaptionTokenizer.from_file(tiny_tokenizer_json(tmp_path / "tokenizer.json"))


def ids_of(*words: str) -> list[int]:
    return [4 + WORDS.index(w) for w in words]


def test_tokenizer_bos_handling(tmp_path: Path, tiny_tok: CaptionTokenizer) -> None:
    assert tiny_tok.encode("a b") == [2, *ids_of("a", "b")]  # one <bos>, no <eos>, no padding
    assert tiny_tok.encode("a b", add_special_tokens=False) == ids_of("a", "b")
    conf = {"bos_token": {"content": "<bos>", "lstrip": False}, "pad_token": "<pad>", "add_eos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
    with_eos = CaptionTokenizer.from_dir(tmp_path)
    assert with_eos.encode("a") == [2, *ids_of("a"), 1]


def test_prompt_padding_truncation_and_kept_positions(tiny_tok: CaptionTokenizer) -> None:
    chi = ["a b", "User Prompt: "]  # upstream's last line ends with a space too
    n_chi = len(tiny_tok.encode("a b\nUser Prompt: "))  # with <bos>
    assert n_chi == 5
    ids, mask, keep = build_prompt_batch(tiny_tok, ["c d", "c d e f c d e f c"], chi, caption_max_tokens=6)
    max_length = n_chi + 6 - 2
    assert ids.shape == mask.shape == (2, max_length) and ids.dtype == np.int32
    head = [2, *ids_of("a", "b", "User", "Prompt:")]
    # Right padding with <pad> and mask 0.
    assert ids[0].tolist() == head + ids_of("c", "d") + [0, 0]
    assert mask[0].tolist() == [1] * 7 + [0] * 2
    # Truncation keeps <bos> and cuts the end of the caption.
    assert ids[1].tolist() == head + ids_of("c", "d", "e", "f")
    assert mask[1].tolist() == [1] * max_length
    # BOS plus the last caption_max_tokens - 1 positions (upstream [0] + range(-5, 0)).
    assert keep.tolist() == [0, 4, 5, 6, 7, 8]
    assert keep.tolist() == [list(range(max_length))[i] for i in [0] + list(range(-5, 0))]


def test_prompt_is_plain_concatenation(tiny_tok: CaptionTokenizer) -> None:
    # "\n".join(lines) + caption: no separator between the CHI prompt and the caption.
    ids, _, _ = build_prompt_batch(tiny_tok, ["b"], ["a", "c"], caption_max_tokens=4)
    assert ids[0, :3].tolist() == [2, *ids_of("a"), 3]  # "cb" is one (unknown) word
    # Without a CHI prompt the captions go alone and max_length is caption_max_tokens.
    ids, mask, keep = build_prompt_batch(tiny_tok, ["a b"], [], caption_max_tokens=4)
    assert ids.tolist() == [[2, *ids_of("a", "b"), 0]] and keep.tolist() == [0, 1, 2, 3]
    with pytest.raises(InputError):
        build_prompt_batch(tiny_tok, "a b", [])
    with pytest.raises(InputError):
        keep_positions(3, 6)


def test_chi_prompt_data() -> None:
    lines = load_chi_prompt()
    assert len(lines) == 8
    assert lines[0].startswith('Given a user prompt, generate an "Enhanced prompt"')
    assert lines[-1] == "User Prompt: "
    src = json.loads((Path(__file__).resolve().parents[1] / "configs" / "chi_prompt.json").read_text())
    assert src["source"].startswith("nv-tlabs/PiD@2c8814c2b91cc41a2be7809962c891e0d0ccff5f ")


def test_caption_encoder_end_to_end(tmp_path: Path, gemma_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tmp_path / "gemma"
    model_dir.mkdir()
    shutil.copy(gemma_dir / "config.json", model_dir)
    shutil.copy(gemma_dir / "model.safetensors", model_dir)
    tiny_tokenizer_json(model_dir / "tokenizer.json")
    chi = ["a b c", "User Prompt: "]
    enc = CaptionEncoder.from_pretrained(model_dir, dtype="float32", chi_lines=chi)
    captions = ["d e", "f " * 400]
    out, kept_mask = enc.encode(captions, return_mask=True)
    assert out.shape == (2, 300, 64) and out.dtype == np.float32 and np.isfinite(out).all()

    ids, mask, keep = enc.tokenize(captions)
    assert ids.shape[1] == 6 + 300 - 2 and mask[1].all() and not mask[0].all()
    cfg = GemmaConfig.from_json(model_dir / "config.json")
    graphdef, state = nnx.split(load_gemma_model(model_dir, cfg, "float32"))
    full = make_forward(graphdef)(state, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(out, np.asarray(full)[:, keep], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(kept_mask, mask[:, keep])

    leaves = jax.tree_util.tree_leaves(enc._state)
    enc.release()
    assert enc.released and all(x.is_deleted() for x in leaves)
    with pytest.raises(InputError):
        enc.encode(["a"])

    with pytest.raises(CheckpointError):
        CaptionEncoder.from_pretrained(tmp_path / "nowhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="offline"):
        CaptionEncoder.from_pretrained("someone/not-cached", cache_dir=tmp_path / "hub")
