"""`pid-jax decode --prompt` end to end: a small random Gemma-2 whose width matches a small PiD network."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import tokenizers
from conftest import fixture
from pid_jax.convert.pidnet import state_dict_of
from PIL import Image

from pid_jax.cli import main
from pid_jax.config import load_preset
from pid_jax.modeling import init_pidnet
from pid_jax.weights import write_converted


def _gemma_dir(root: Path) -> Path:
    """The fixture Gemma (width 64) plus a word-level tokenizer with Gemma's special-token ids."""
    d = root / "gemma"
    d.mkdir()
    shutil.copy(fixture("gemma2", "config.json"), d)
    shutil.copy(fixture("gemma2", "model.safetensors"), d)
    words = ["a", "red", "fox", "in", "the", "snow", "User", "Prompt:"]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3} | {w: 4 + i for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>"])
    tok.save(str(d / "tokenizer.json"))
    return d


def test_decode_with_prompt_end_to_end(tmp_path: Path, capsys) -> None:
    preset = load_preset("demo")  # txt_embed_dim 64 = the fixture Gemma's hidden size
    assert preset.network.txt_embed_dim == 64
    ckpt = write_converted(tmp_path / "net", preset, state_dict_of(init_pidnet(preset.network, seed=1)))
    gemma = _gemma_dir(tmp_path)
    z = np.random.default_rng(0).standard_normal((2, 16, 4, 4)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    out = tmp_path / "img.png"
    args = [
        "decode",
        "--checkpoint",
        str(ckpt),
        "--latent",
        str(tmp_path / "z.npy"),
        "--gemma",
        str(gemma),
        "--dtype",
        "float32",
        "--steps",
        "2",
        "--free-encoder",
        "--out",
        str(out),
    ]
    assert main([*args, "--prompt", "a red fox in the snow"]) == 0, capsys.readouterr().err
    first = [np.asarray(Image.open(tmp_path / f"img_{i}.png")) for i in range(2)]
    assert all(a.shape == (128, 128, 3) for a in first)
    assert "a red fox" in Image.open(tmp_path / "img_0.png").text["pid-jax"]

    # Another caption changes the conditioning, hence the image (same seed, same latent).
    assert main([*args, "--prompt", "the snow", "--out", str(tmp_path / "other.png")]) == 0
    other = np.asarray(Image.open(tmp_path / "other_0.png"))
    assert not np.array_equal(first[0], other)

    # encode-caption gives the embeddings that --caption-embeddings reproduces exactly.
    emb = tmp_path / "emb.npy"
    assert (
        main(
            [
                "encode-caption",
                "--prompt",
                "a red fox in the snow",
                "--gemma",
                str(gemma),
                "--dtype",
                "float32",
                "--out",
                str(emb),
            ]
        )
        == 0
    )
    e = np.load(emb)
    assert e.shape == (1, 300, 64)
    np.save(tmp_path / "emb2.npy", np.concatenate([e, e]))
    again = tmp_path / "again.png"
    assert (
        main(
            [
                "decode",
                "--checkpoint",
                str(ckpt),
                "--latent",
                str(tmp_path / "z.npy"),
                "--caption-embeddings",
                str(tmp_path / "emb2.npy"),
                "--dtype",
                "float32",
                "--steps",
                "2",
                "--out",
                str(again),
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again_0.png")), first[0])


def test_prompt_and_embeddings_are_exclusive(tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "z.npy", np.zeros((1, 16, 4, 4), np.float32))
    rc = main(
        [
            "decode",
            "--checkpoint",
            "x",
            "--config",
            "demo",
            "--latent",
            str(tmp_path / "z.npy"),
            "--out",
            str(tmp_path / "o.png"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--prompt" in err[0]
    assert not list(tmp_path.glob("*.png"))
