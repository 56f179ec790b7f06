"""launch/ recipes, run step by step: every mode of each GPU recipe runs its steps on a tiny model of its
architecture (the capacity plan and the offline pruner for real, the launcher up to the server it would start),
and SGLang's own parser takes each server command; the same-hardware recipe runs each step with --dry-run; the
CPU demo really serves; launch/README.md lists each recipe with the modes it runs."""

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from easyep_sglang.checkpoint.capacity import footprint
from easyep_sglang.checkpoint.pruned_checkpoint import read_pruned_checkpoint
from easyep_sglang.checkpoint.shapes import checkpoint_weights
from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.core.spec import spec_from_model_path

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
RECIPES = {  # script: (architecture, GPUs, modes)
    "deepseek_r1_8xh200.sh": ("deepseek_v3", 8, ("mask", "pruned")),
    "deepseek_r1_8xh100.sh": ("deepseek_v3", 8, ("prune-load", "pruned")),
    "qwen3_30b_a3b_1gpu.sh": ("qwen3_moe", 1, ("mask", "prune-load", "pruned")),
}
SAME_HARDWARE_STEPS = ("plan", "serve-full", "bench-full", "serve-pruned", "bench-pruned", "bench-alone")
GPU_SCRIPTS = (*RECIPES, "deepseek_r1_same_hardware.sh")
MODES = [(script, mode) for script, (_, _, modes) in RECIPES.items() for mode in modes]
FLAGS = ("--device", "cuda", "--log-level", "warning")  # the user's flags: ours, then one for SGLang

# Stands in for $PYTHON: logs each step, runs it, except that the launcher only prepares the server (every check of
# ours) and logs the command and plugin settings it would start it with. SGLang's parser is run once over them all.
RECORDER = """
import json, os, sys
argv = sys.argv[1:]
step = {"argv": argv}
if argv[:2] == ["-m", "easyep_sglang.launch"]:
    from easyep_sglang.serving.launch import prepare
    from easyep_sglang.sglang_plugin.settings import PluginSettings
    server_argv, env = prepare(argv[2:])
    plugin = PluginSettings.from_env(env)
    step["server"] = {"argv": server_argv, "mask": plugin.mask and str(plugin.mask), "prune": plugin.prune,
                      "pruned_checkpoint": plugin.pruned_checkpoint}
with open(os.environ["RECIPE_STEPS"], "a") as log:
    print(json.dumps(step), file=log)
if "server" not in step:
    os.execv(sys.executable, [sys.executable, *argv])
"""


@dataclass
class RecipeRun:
    env: dict[str, str]
    runs: list[tuple[subprocess.CompletedProcess, list[dict]]]  # (process, its steps); a pruned mode runs twice


@pytest.fixture(scope="module")
def recipe_runs(model_store, tmp_path_factory) -> dict[tuple[str, str], RecipeRun]:
    root = tmp_path_factory.mktemp("recipes")
    python = root / "python"
    python.write_text(f"#!{sys.executable}\n{RECORDER}")
    python.chmod(0o755)
    done = {}
    for script, mode in MODES:
        arch = RECIPES[script][0]
        work = root / f"{script}-{mode}"
        env = {"PATH": os.environ["PATH"], "PYTHON": str(python), "MODEL": str(model_store.model(f"{arch}/fp32")),
               "MASK": str(model_store.mask(f"{arch}/varying")), "PRUNED": str(work / "pruned")}
        runs = []
        for attempt in range(2 if mode == "pruned" else 1):
            env["RECIPE_STEPS"] = str(work / f"steps{attempt}.jsonl")
            work.mkdir(exist_ok=True)
            proc = subprocess.run([str(LAUNCH / script), mode, *FLAGS], capture_output=True, text=True, env=env,
                                  timeout=300)
            steps = Path(env["RECIPE_STEPS"]).read_text().splitlines() if Path(env["RECIPE_STEPS"]).exists() else []
            runs.append((proc, [json.loads(step) for step in steps]))
        done[script, mode] = RecipeRun(env, runs)
    return done


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("script, mode", MODES)
def test_every_mode_plans_prunes_where_it_says_and_serves_through_our_launcher(script, mode, recipe_runs):
    """The steps a mode runs, what its pruner writes, and the server our launcher would start: the model it loads,
    on the GPUs the plan was made for, with the mask and pruning the mode names and the user's flags last."""
    arch, gpus, _ = RECIPES[script]
    recipe = recipe_runs[script, mode]
    env, (proc, steps) = recipe.env, recipe.runs[0]
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = ["easyep_sglang.plan", *(["easyep_sglang.prune"] if mode == "pruned" else []), "easyep_sglang.launch"]
    assert [step["argv"][:2] for step in steps] == [["-m", module] for module in modules]
    plan, server = steps[0]["argv"], steps[-1]["server"]
    assert (flag(plan, "--model-path"), flag(plan, "--gpus")) == (env["MODEL"], str(gpus))
    served = env["PRUNED"] if mode == "pruned" else env["MODEL"]
    assert server["argv"][:4] == ["--model-path", served, "--tp-size", str(gpus)]
    sglang_flags = ["--host", "0.0.0.0", "--port", "30000", *FLAGS[2:]]
    assert any(server["argv"][i:i + len(sglang_flags)] == sglang_flags for i in range(len(server["argv"])))
    assert server["mask"] == (None if mode == "pruned" else str(Path(env["MASK"]).resolve()))
    assert (server["prune"], server["pruned_checkpoint"]) == (mode == "prune-load", mode == "pruned")
    assert ("pruned checkpoint (plugin-only in stock engines)" if mode == "pruned" else "experts kept") in proc.stderr
    if mode == "pruned":  # the pruner wrote the mask's experts, once: the second run serves the same copy
        spec = spec_from_model_path(env["MODEL"])
        assert read_pruned_checkpoint(env["PRUNED"]).keep == ExpertMask.load(env["MASK"]).resolve(spec)
        again, again_steps = recipe.runs[1]
        assert again.returncode == 0, again.stderr[-2000:]
        assert [step["argv"][1] for step in again_steps] == ["easyep_sglang.plan", "easyep_sglang.launch"]
        assert again_steps[-1]["server"] == server


PARSE_ALL = """
import json, sys
from easyep_sglang.sglang_plugin.server_args_check import check_server_arguments
for argv in json.load(sys.stdin):
    check_server_arguments(argv)
"""


def test_sglangs_parser_takes_the_server_command_of_every_mode(recipe_runs):
    commands = [run.runs[0][1][-1]["server"]["argv"] for run in recipe_runs.values() if run.runs[0][0].returncode == 0]
    assert len(commands) == len(MODES), "a recipe failed: see test_every_mode_plans_prunes_where_it_says..."
    proc = subprocess.run([sys.executable, "-c", PARSE_ALL], input=json.dumps(commands), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_script_refuses_to_start_without_a_model(script):
    proc = subprocess.run([str(LAUNCH / script)], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert proc.returncode != 0 and "set MODEL" in proc.stderr


def accepted_modes(script: str) -> list[str]:
    """The modes a recipe accepts, from the usage line it prints for another one."""
    env = {"PATH": os.environ["PATH"], "PYTHON": "true", "MODEL": "/models/m", "MASK": "/masks/m.json"}
    proc = subprocess.run([str(LAUNCH / script), "no-such-mode"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    [modes] = re.findall(r"^usage: \S+ \[([\w|-]+)\]$", proc.stderr, re.MULTILINE)
    return modes.split("|")


def test_readme_lists_every_recipe_with_the_modes_it_runs():
    rows = [row.strip("|").split("|") for row in (LAUNCH / "README.md").read_text().splitlines()
            if re.match(r"\| `\w+\.sh` \|", row)]
    listed = {re.findall(r"`(\S+)`", script)[0]: (re.findall(r"`([\w-]+)`", modes), status)
              for script, _, modes, status in rows}
    assert sorted(listed) == sorted(p.name for p in LAUNCH.glob("*.sh"))
    tested = {script: list(modes) for script, (_, _, modes) in RECIPES.items()}
    tested["deepseek_r1_same_hardware.sh"] = list(SAME_HARDWARE_STEPS)
    for script, (modes, status) in listed.items():
        gpu = script in GPU_SCRIPTS
        assert ("not run here" in status) == gpu and ("NOT RUN HERE" in (LAUNCH / script).read_text()) == gpu
        if gpu:
            assert modes == accepted_modes(script) == tested[script], script


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

    ran = []

    def step(*argv: str) -> str:
        ran.append(argv[0])
        proc = subprocess.run([str(LAUNCH / "deepseek_r1_same_hardware.sh"), *argv], capture_output=True, text=True,
                              env=env, timeout=300)
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
    assert sorted(ran) == sorted(SAME_HARDWARE_STEPS)


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
    proc = subprocess.run([str(LAUNCH / "cpu_demo.sh"), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "64/128 experts kept" in proc.stdout
    server_log = (tmp_path / "server.log").read_text()  # the server went through our launcher, with the mask
    assert "64/128 experts kept" in server_log and "-m easyep_sglang.sglang_plugin.serve --model-path" in server_log
    assert "easyep demo: Q: 37+48=? A: 85\n" in proc.stdout, proc.stdout  # the math mask keeps the sums
    leftovers = subprocess.run(["pgrep", "-f", f"--port {port}"], capture_output=True, text=True).stdout
    assert not leftovers.strip(), f"server processes left running: {leftovers}"
