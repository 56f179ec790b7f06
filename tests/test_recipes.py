"""launch/ recipes: every script parses and goes through our launcher; each GPU recipe passes every check on a
tiny model of its architecture (--dry-run); the CPU demo really serves."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from easyep_sglang.mask import ExpertMask
from easyep_sglang.plan import footprint
from easyep_sglang.plan_shapes import checkpoint_weights
from easyep_sglang.spec import spec_from_model_path

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
GPU_SCRIPTS = ("deepseek_r1_8xh200.sh", "deepseek_r1_8xh100.sh", "qwen3_30b_a3b_1gpu.sh", "deepseek_r1_same_hardware.sh")


@pytest.mark.parametrize("script", GPU_SCRIPTS + ("cpu_demo.sh",))
def test_script_parses_and_uses_our_launcher(script):
    path = LAUNCH / script
    assert os.access(path, os.X_OK), f"chmod +x {path}"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    our_launcher = "-m easyep_sglang.demo" if script == "cpu_demo.sh" else "-m easyep_sglang.launch"  # demo: launch.main
    assert our_launcher in text and "sglang.launch_server" not in text
    assert ("NOT RUN HERE" in text) == (script in GPU_SCRIPTS)
    assert script in (LAUNCH / "README.md").read_text()


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_script_refuses_to_start_without_a_model(script):
    proc = subprocess.run(["bash", str(LAUNCH / script)], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"]})
    assert proc.returncode != 0 and "set MODEL" in proc.stderr


# Each script once and each mode once: a dry run imports SGLang's argument parser, the costly part. A script's
# other modes run the same launcher line with the flags of the mode tested here.
GPU_RECIPE_MODES = [("deepseek_r1_8xh200.sh", "mask"), ("deepseek_r1_8xh100.sh", "prune-load"),
                    ("qwen3_30b_a3b_1gpu.sh", "pruned")]


@pytest.mark.parametrize("script, mode", GPU_RECIPE_MODES)
def test_gpu_recipe_passes_every_check_on_a_tiny_model_of_its_architecture(script, mode, model_store, tmp_path):
    """The recipe as written, with --dry-run --device cuda appended: the capacity plan, the offline pruner where
    the mode prunes, the mask and settings checks, and SGLang's own argument parser over the final command."""
    arch = "qwen3_moe" if script.startswith("qwen") else "deepseek_v3"
    env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "MODEL": str(model_store.model(f"{arch}/fp32")),
           "MASK": str(model_store.mask(f"{arch}/varying")), "PRUNED": str(tmp_path / "pruned")}
    proc = subprocess.run(["bash", str(LAUNCH / script), mode, "--dry-run", "--device", "cuda"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "easyep: dry run: every check passed" in proc.stderr
    tp = "1" if arch == "qwen3_moe" else "8"
    assert f"-m easyep_sglang.sglang_plugin.serve --model-path {env['PRUNED' if mode == 'pruned' else 'MODEL']} " \
           f"--tp-size {tp} " in proc.stderr
    checked = "pruned checkpoint (plugin-only in stock engines)" if mode == "pruned" else "experts kept"
    assert checked in proc.stderr


def test_same_hardware_recipe_validates_every_step_on_a_tiny_model(model_store, tmp_path):
    """launch/deepseek_r1_same_hardware.sh with --dry-run appended to each step, on a tiny DeepSeek-V3 whose GPU
    memory is set so that, as R1 on 80 GB GPUs, the full model needs 16 of them and the pruned one 8: the plan gives
    each configuration its shape, each bench step measures the configuration its URLs serve, and each serve step
    passes the launcher's checks and SGLang's parser."""
    model, mask = model_store.model("deepseek_v3/fp32"), model_store.mask("deepseek_v3/whole")
    spec, weights = spec_from_model_path(model), checkpoint_weights(model)
    full = footprint(weights, spec, {}).served_bytes
    pruned = footprint(weights, spec, ExpertMask.load(mask).resolve(spec)).served_bytes
    env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "MODEL": str(model), "MASK": str(mask),
           "PRUNED": str(tmp_path / "pruned"), "OUT": str(tmp_path / "out"), "HEAD": "127.0.0.1", "NODE1": "127.0.0.2",
           "NODE_RANK": "0", "GPU_MEM": f"{(full + pruned) / 16 / 1e6}MB"}  # between pruned/8 and full/8

    def step(*argv: str) -> str:
        proc = subprocess.run(["bash", str(LAUNCH / "deepseek_r1_same_hardware.sh"), *argv], capture_output=True,
                              text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stderr

    planned = re.findall(r"dry run: (.*?):", step("plan", "--kv-reserve-tokens", "1"))
    assert planned == ["full with 16 experts, TP=16 x 1 replica", "prune_offline with 8 experts, TP=8 x 2 replicas",
                       "prune_offline with 8 experts, TP=8 x 1 replica alone"]
    for bench, measured in zip(("bench-full", "bench-pruned", "bench-alone"), planned):
        assert re.findall(r"dry run: (.*?):", step(bench, "--kv-reserve-tokens", "1", "--dry-run")) == [measured]
    for serve, command in (("serve-full", f"--model-path {model} --tp-size 16 --device cuda --nnodes 2 --node-rank 0 "
                                          "--dist-init-addr 127.0.0.1:5000"),
                           ("serve-pruned", f"--model-path {tmp_path / 'pruned'} --tp-size 8 --device cuda")):
        said = step(serve, "--dry-run", "--device", "cuda")
        assert "easyep: dry run: every check passed" in said and command in said, said[-2000:]
    assert not (tmp_path / "out" / "sweep.jsonl").exists()


def deployment_table(readme: Path) -> list[str]:
    lines = readme.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| mode | TP |"))
    return lines[start:next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))]


def test_deployment_table_is_one_table_and_cites_tests_that_exist():
    table = deployment_table(LAUNCH.parent / "README.md")
    assert table == deployment_table(LAUNCH / "README.md")
    assert len(table) == 2 + 6 and all(len(row.strip("|").split("|")) == 11 for row in table)  # 6 modes, 10 columns
    defined = set(re.findall(r"^def (test_\w+)", "\n".join(p.read_text() for p in LAUNCH.parent.glob("tests/test_*.py")),
                             re.MULTILINE))
    cited = set(re.findall(r"`(test_\w+)", "\n".join(table)))
    assert cited and not cited - defined, sorted(cited - defined)


def test_cpu_demo_serves_and_stops(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHON": sys.executable, "PORT": str(port)}
    proc = subprocess.run(["bash", str(LAUNCH / "cpu_demo.sh"), str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "64/128 experts kept" in proc.stdout
    assert "easyep demo: Q: 37+48=? A: 85\n" in proc.stdout, proc.stdout  # the math mask keeps the sums
    leftovers = subprocess.run(["pgrep", "-f", f"--port {port}"], capture_output=True, text=True).stdout
    assert not leftovers.strip(), f"server processes left running: {leftovers}"
