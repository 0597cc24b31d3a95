"""Bad training data is found before anything is written (issue 18, item 5): every image decoded up front, all
bad files reported at once, `--skip-bad`, and no shared memory left behind by grain workers on an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_helpers import ROOT, make_images, tiny_preset

from pid_jax import cli


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("bad")
    preset = tiny_preset(d)
    data = make_images(d / "data", 4, 40, 40, captions=True)
    good = (data / "img00.png").read_bytes()
    (data / "img01.png").write_bytes(good[: len(good) // 2])  # truncated: the header still reads
    (data / "img02.png").write_bytes(b"not an image")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 3] = 100
    Image.fromarray(rgba, "RGBA").save(data / "img03.png")
    make_images(d / "more", 2, 40, 40, captions=True)
    for p in (d / "more").iterdir():
        os.replace(p, data / p.name.replace("img", "ok"))
    return d, preset, data


@pytest.fixture(autouse=True)
def _no_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PID_JAX_COMPILATION_CACHE", "0")


def _args(d: Path, preset: Path, data: Path, out: str, *extra: str) -> list[str]:
    return ["train", "--config", str(preset), "--data", str(data), "--steps", "2", "--size", "32x32",
            "--out", str(d / out), "--no-export", *extra]  # fmt: skip


def test_every_bad_file_is_reported_before_anything_is_written(setup, capsys, monkeypatch) -> None:
    import pid_jax.train.step

    def boom(*a, **k):
        raise AssertionError("the train step was reached")

    monkeypatch.setattr(pid_jax.train.step, "train_step", boom)
    d, preset, data = setup
    before = _shm()
    rc = cli.main(_args(d, preset, data, "refused", "--workers", "2"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: 3 of 6 training images are bad"), err
    line = err[0]
    assert "pass --skip-bad" in line
    assert f"image {data / 'img01.png'}: unreadable or truncated" in line
    assert f"image {data / 'img02.png'}: unreadable or truncated" in line
    assert f"image {data / 'img03.png'}: has transparent pixels (alpha channel)" in line
    assert "img00.png" not in line and "ok00.png" not in line
    assert not (d / "refused").exists()  # no run.json, log, checkpoints: the rerun is not refused
    assert _shm() - before == set()


def test_skip_bad_trains_on_the_rest_and_says_so(setup, capsys) -> None:
    d, preset, data = setup
    assert cli.main(_args(d, preset, data, "skipping", "--skip-bad", "--batch", "2")) == 0, capsys.readouterr().err
    out = d / "skipping"
    run = json.loads((out / "run.json").read_text())
    assert run["skipped"] == [str(data / f"img0{i}.png") for i in (1, 2, 3)]
    assert len(run["skipped_reasons"]) == 3 and "unreadable or truncated" in run["skipped_reasons"][0]
    log = (out / "log.txt").read_text()
    assert "--skip-bad: 3 bad image(s) left out:" in log
    assert all(f"skipped image {data / f'img0{i}.png'}" in log for i in (1, 2, 3))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # The resume skips the same files (and refuses to resume without --skip-bad: other data).
    assert cli.main([*_args(d, preset, data, "skipping", "--skip-bad", "--batch", "2"), "--resume"]) == 0
    capsys.readouterr()
    assert cli.main([*_args(d, preset, data, "skipping", "--batch", "2"), "--resume"]) == 2
    assert "3 of 6 training images are bad" in capsys.readouterr().err
    (d / "all_bad").mkdir()
    (d / "all_bad" / "x.png").write_bytes(b"junk")
    assert cli.main(_args(d, preset, d / "all_bad", "none", "--skip-bad")) == 2
    assert "all 1 training images are bad" in capsys.readouterr().err
    assert not (d / "none").exists()


WORKER_ERROR = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from pid_jax.errors import InputError
    from pid_jax.train import data as D

    def main():
        d = Path(sys.argv[1])
        spec = D.DataSpec(32, 32, (4, 8))
        records, _ = D.check(D.scan(d), spec)
        loader = D.SampleLoader(tuple(records), spec, np.zeros((4, 8), np.float32), 0)
        (d / "img01.png").write_bytes(b"\\x89PNG\\r\\n\\x1a\\n" + b"\\x00" * 20)  # damaged after the check
        it = D.BatchIterator(D.make_dataset(loader, 2), workers=2).start()
        try:
            for _ in range(8):
                next(it)
        except InputError as e:
            print("error:", e)
        finally:
            it.close()

    if __name__ == "__main__":  # grain's workers are spawned: they import this module
        main()
    """
)


def test_worker_error_leaves_no_shared_memory(tmp_path: Path) -> None:
    """A worker that fails mid-run (a file damaged after the up-front check): one line, and after the process
    ends nothing of it is left in /dev/shm (grain used to leave its batches' shared-memory blocks)."""
    d = make_images(tmp_path / "d", 6, 40, 48)
    script = tmp_path / "worker_error.py"
    script.write_text(WORKER_ERROR)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    before = _shm()
    proc = subprocess.run([sys.executable, str(script), str(d)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "img01.png: unreadable or truncated" in lines[0], proc.stdout
    assert "leaked" not in proc.stderr, proc.stderr[-2000:]
    assert _shm() - before == set()
