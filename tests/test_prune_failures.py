"""The offline pruner interrupted, or given bad input: a one-line error, a non-zero exit, nothing half-written."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from easyep_sglang.checkpoint import safetensors_stream
from easyep_sglang.core.spec import spec_from_config
from synthetic_checkpoints import (DEEPSEEK_CONFIG, ROOT, WHOLE_GROUPS, assert_nothing_written, checksums, deepseek,
                                   run_main, write_mask)


# ---- interruption ------------------------------------------------------------------------------------
DRIVER = """
import signal, sys, time
from easyep_sglang.checkpoint import prune
from easyep_sglang.checkpoint import safetensors_stream
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal; a background shell starts us ignoring it
real_copy, calls = safetensors_stream.copy_range, []
def copy_then_stall(*args):
    real_copy(*args)
    calls.append(1)
    if len(calls) == 5:  # mid-write: tell the test, then stall until it signals
        open(sys.argv[1], "w").close()
        time.sleep(120)
safetensors_stream.copy_range = copy_then_stall
sys.exit(prune.main(sys.argv[2:]))
"""


def _start_and_stall(src: Path, mask: Path, out: Path, tmp_path: Path) -> subprocess.Popen:
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(ready), "--model-path", str(src), "--mask", str(mask),
                             "--out", str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert list(out.parent.glob(f".{out.name}.easyep-tmp-*/*.safetensors"))  # a shard is half-written
    return proc


def test_sigint_midway_removes_partial_output(deepseek, tmp_path):
    src, before = deepseek
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    out = tmp_path / "pruned"
    proc = _start_and_stall(src, mask, out, tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert_nothing_written(out)
    assert checksums(src) == before


def test_sigkill_midway_leaves_no_output(deepseek, tmp_path, capsys):
    src, before = deepseek
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    out = tmp_path / "pruned"
    proc = _start_and_stall(src, mask, out, tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    assert not out.exists() and checksums(src) == before
    leftovers = list(tmp_path.glob(".pruned.easyep-tmp-*"))
    assert leftovers and all(p != out for p in leftovers)
    rc, err = run_main(capsys, "--model-path", src, "--mask", mask, "--out", out)  # a rerun succeeds and says so
    assert rc == 0 and "leftover" in err and str(leftovers[0]) in err


# ---- bad inputs: a one-line error, a non-zero exit, nothing written --------------------------------------
@pytest.fixture
def broken_copy(deepseek, tmp_path) -> Path:
    return Path(shutil.copytree(deepseek[0], tmp_path / "copy"))


def _expect_error(capsys, src: Path, mask: Path, out: Path, *needles: str) -> None:
    rc, err = run_main(capsys, "--model-path", src, "--mask", mask, "--out", out)
    message = err.strip().split("\n")[-1]  # below the progress bar, when writing had started
    assert rc == 1 and message.startswith("easyep prune: error: "), err
    assert all(n in message for n in needles), err
    assert_nothing_written(out)


def test_mask_for_another_model(deepseek, tmp_path, capsys):
    other = spec_from_config({**DEEPSEEK_CONFIG, "n_routed_experts": 256, "n_group": 8, "topk_group": 4})
    mask = write_mask(tmp_path / "mask.json", {1: list(range(128))}, other)
    _expect_error(capsys, deepseek[0], mask, tmp_path / "out", "another model", "select a mask for this model")


def test_missing_shard(broken_copy, tmp_path, capsys):
    (broken_copy / "model-00003-of-00004.safetensors").unlink()
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    _expect_error(capsys, broken_copy, mask, tmp_path / "out", "model-00003-of-00004.safetensors", "missing")


def test_corrupt_index(broken_copy, tmp_path, capsys):
    (broken_copy / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    _expect_error(capsys, broken_copy, mask, tmp_path / "out", "model.safetensors.index.json is corrupt")


def test_corrupt_and_truncated_shard(broken_copy, tmp_path, capsys):
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    shard = broken_copy / "model-00002-of-00004.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:8] + b"#garbage" + data[16:])
    _expect_error(capsys, broken_copy, mask, tmp_path / "out", str(shard), "corrupt header")
    shard.write_bytes(data[:-100])
    _expect_error(capsys, broken_copy, mask, tmp_path / "out", str(shard), "truncated")


def test_missing_config(broken_copy, tmp_path, capsys):
    (broken_copy / "config.json").unlink()
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    _expect_error(capsys, broken_copy, mask, tmp_path / "out", "config.json not found")


def test_existing_out_needs_force(deepseek, tmp_path, capsys):
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = run_main(capsys, "--model-path", deepseek[0], "--mask", mask, "--out", out)
    assert rc == 1 and "already exists" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    rc, err = run_main(capsys, "--model-path", deepseek[0], "--mask", mask, "--out", out, "--force")
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not list(tmp_path.glob(".out.easyep-*"))


def test_out_inside_model_dir_is_refused(deepseek, tmp_path, capsys):
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    src, before = deepseek
    rc, err = run_main(capsys, "--model-path", src, "--mask", mask, "--out", src / "pruned")
    assert rc == 1 and "overlaps" in err and checksums(src) == before


def test_full_disk_tmpfs(deepseek, tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
        _expect_error(capsys, deepseek[0], mask, small / "out", f"device holding {small}", "choose another --out")
        assert not list(small.iterdir())
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_disk_full_midway(deepseek, tmp_path, capsys, monkeypatch):
    real_copy, calls = safetensors_stream.copy_range, []

    def copy_until_full(*args):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_copy(*args)

    monkeypatch.setattr(safetensors_stream, "copy_range", copy_until_full)
    mask = write_mask(tmp_path / "mask.json", WHOLE_GROUPS)
    out = tmp_path / "deep" / "out"
    _expect_error(capsys, deepseek[0], mask, out, f"no space left on the device holding {out.parent}")
    assert checksums(deepseek[0]) == deepseek[1]


