"""A server asked to mask, prune or record fails closed: each failure below, injected for real into a real
SGLang server started through our launcher, makes the launcher exit non-zero before it serves, with one
line naming the worker and the cause.

Startup is checked through LaunchedServer, which returns only once /health answers (SGLang's /health runs a
real generation) and raises as soon as the launcher exits: a raise means no request ever got a completion.
"""

import dataclasses
import re
import textwrap
from pathlib import Path
import threading
import time

import pytest

from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.serving import calibrate
from easyep_sglang.serving.launch import prepare
from easyep_sglang.serving.server_process import LaunchedServer, LoopbackNodes
from easyep_sglang.sglang_plugin import fail_closed
from easyep_sglang.sglang_plugin.fail_closed import WorkerReport
from easyep_sglang.sglang_plugin.served_mask import ServedMask
from server_specs import MASKS

STOP_WITHIN_S = 30
STOPPED = "easyep: error: server stopped before serving: "


def _half_mask(model, path, upper: bool = False):
    spec = spec_from_model_path(model)
    half = range(spec.n_experts // 2, spec.n_experts) if upper else range(spec.n_experts // 2)
    ExpertMask.for_spec(spec, {layer: list(half) for layer in spec.moe_layers}, "test").save(path)
    return path


def _fails_closed(tmp_path, model, *extra_args, env=None) -> str:
    """Start a masked server that must fail; return the launcher's one-line cause."""
    server = LaunchedServer(model, mask=_half_mask(model, tmp_path / "mask.json"), extra_args=list(extra_args),
                            env=env, log_path=tmp_path / "server.log", startup_timeout=300)
    try:
        return _stops_before_serving(server.log_path, server.start, RuntimeError, "server exited with 1 during startup")
    finally:
        server.stop()


def _stops_before_serving(log: Path, start, raises, match: str, failure_marker: str | None = None) -> str:
    """Run `start`, which must raise `raises` (matching `match`) as the server exits; check the log and, with
    `failure_marker`, that the exit came within STOP_WITHIN_S of the worker's failure. Return the cause line."""
    failed_at, done = [], threading.Event()

    def watch_log():  # when the worker's failure first shows in the log
        while failure_marker and not failed_at and not done.wait(0.2):
            if log.exists() and failure_marker in log.read_text(errors="replace"):
                failed_at.append(time.monotonic())

    threading.Thread(target=watch_log, daemon=True).start()
    try:
        with pytest.raises(raises, match=match):
            start()
        exited_at = time.monotonic()  # LaunchedServer polls the process every second
    finally:
        done.set()
    text = log.read_text(errors="replace")
    assert "Uvicorn running" not in text and "Application startup complete" not in text
    lines = [line for line in text.splitlines() if line.startswith(STOPPED)]
    assert len(lines) == 1, text[-3000:]
    if failure_marker:
        assert failed_at, f"{failure_marker!r} not in the log"
        assert exited_at - failed_at[0] < STOP_WITHIN_S
    return lines[0]


def test_worker_that_raises_in_our_hook_stops_the_server(tmp_path, tiny_models):
    """The recorder refuses mixed chunks in our hook after the model loads. calibrate, which started the server,
    exits naming the cause, and keeps the server log its message points to."""
    (tmp_path / "prompts.txt").write_text("hello\n")
    log = calibrate.server_log_path()
    argv = ["--model-path", str(tiny_models["qwen3_moe"]), "--prompts", str(tmp_path / "prompts.txt"), "--domain", "x",
            "--out", str(tmp_path / "s.safetensors"), "--enable-mixed-chunk"]
    try:
        line = _stops_before_serving(log, lambda: calibrate.main(argv), SystemExit,
                                     f"(?s)log: {re.escape(str(log))}.*calibrate without --enable-mixed-chunk",
                                     failure_marker="Scheduler hit an exception")
    finally:
        log.unlink(missing_ok=True)
    assert "sglang::scheduler (pid" in line and "calibrate without --enable-mixed-chunk" in line


MOVED_TARGET_PLUGIN = '''
def load_plugin():
    """SGLang as if a release renamed ModelRunner.load_model (a target of our gate mask) to load_model_v2."""
    from sglang.srt.model_executor.model_runner import ModelRunner

    def renamed(self, name):
        if name == "load_model":
            return self.load_model_v2
        raise AttributeError(name)

    ModelRunner.load_model_v2 = ModelRunner.load_model
    del ModelRunner.load_model
    ModelRunner.__getattr__ = renamed
'''


def test_hook_target_that_does_not_resolve_stops_the_server(tmp_path, tiny_models):
    plugins = tmp_path / "plugins"  # a second SGLang plugin, installed as an entry point on PYTHONPATH
    (plugins / "moved_target-0.0.dist-info").mkdir(parents=True)
    (plugins / "moved_target-0.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: moved-target\nVersion: 0.0\n")
    (plugins / "moved_target-0.0.dist-info" / "entry_points.txt").write_text(
        "[sglang.srt.plugins]\nmoved_target = moved_target:load_plugin\n")
    (plugins / "moved_target.py").write_text(textwrap.dedent(MOVED_TARGET_PLUGIN))
    line = _fails_closed(tmp_path, tiny_models["qwen3_moe"], env={"PYTHONPATH": str(plugins)})
    assert "hook targets did not resolve in this SGLang: " in line and "ModelRunner.load_model" in line


def test_worker_without_the_plugin_stops_the_server(tmp_path, tiny_models):
    site = tmp_path / "site"  # the spawned workers alone drop our plugin from SGLang's allowlist
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        'import os, sys\nif "--multiprocessing-fork" in sys.argv:\n    os.environ["SGLANG_PLUGINS"] = "none"\n')
    line = _fails_closed(tmp_path, tiny_models["qwen3_moe"], env={"PYTHONPATH": str(site)})
    assert "worker 0: it did not report, so the easyep plugin did not run in it" in line


def test_node_with_another_mask_stops_both_nodes(tmp_path, model_store):
    """TP=2 over two nodes on loopback, node 1 started (as an operator would, by hand) with another mask. The ranks
    gather their reports over SGLang's world group, so each node's launcher sees the other node's rank and refuses."""
    model = model_store.model("deepseek_v3/fp32")
    mask, other = _half_mask(model, tmp_path / "mask.json"), _half_mask(model, tmp_path / "other.json", upper=True)
    nodes = LoopbackNodes(model, nnodes=2, mask=mask, extra_args=["--tp-size", "2", "--dtype", "float32"],
                          log_path=tmp_path / "server.log")
    node0, node1 = nodes.nodes
    node1.command[node1.command.index("--mask") + 1] = str(other)
    digest, other_digest = ExpertMask.load(mask).digest(), ExpertMask.load(other).digest()
    try:
        nodes.spawn()
        line = _stops_before_serving(node0.log_path, node0.wait_until_healthy, RuntimeError,
                                     "server exited with 1 during startup")
        assert node1.proc.wait(timeout=STOP_WITHIN_S) == 1
    finally:
        nodes.stop()
    assert "worker 1: sglang::scheduler_TP1" in line and f"applied mask {other_digest}" in line, line
    assert f"expected {digest}" in line
    node1_lines = [x for x in node1.log_path.read_text().splitlines() if x.startswith(STOPPED)]
    assert len(node1_lines) == 1 and "worker 0: sglang::scheduler_TP0" in node1_lines[0]
    assert f"applied mask {digest}" in node1_lines[0] and f"expected {other_digest}" in node1_lines[0]


def test_launcher_refuses_an_allowlist_without_the_plugin(tmp_path, tiny_models, monkeypatch):
    model = tiny_models["qwen3_moe"]
    monkeypatch.setenv("SGLANG_PLUGINS", "other_plugin")
    with pytest.raises(ValueError, match="set SGLANG_PLUGINS=other_plugin,easyep"):
        prepare(["--model-path", str(model), "--mask", str(_half_mask(model, tmp_path / "m.json")), "--device", "cpu"])


def test_launcher_refuses_an_untested_sglang_unless_allowed(tmp_path, tiny_models, monkeypatch):
    model = tiny_models["qwen3_moe"]
    args = ["--model-path", str(model), "--mask", str(_half_mask(model, tmp_path / "m.json")), "--device", "cpu"]
    monkeypatch.setattr("easyep_sglang.serving.launch.TESTED_SGLANG_VERSION", "0.0.1")
    with pytest.raises(ValueError, match="pass --allow-untested-sglang"):
        prepare(args)
    prepare([*args, "--allow-untested-sglang"])


def test_a_draft_model_must_report_the_mtp_layers_the_mask_names(model_store):
    """With NEXTN/EAGLE the draft model runs in each scheduler beside the target and masks the MTP layer
    (gate_mask.py). SGLang's draft worker cannot run on this CPU (launch_checks.check_cpu_settings), so the
    server's check is driven directly, with the report a scheduler whose draft never masked would send."""
    spec = spec_from_model_path(model_store.model("deepseek_v3_mtp/fp32"))
    keep = {layer: tuple(ids) for layer, ids in MASKS["deepseek_v3_mtp/whole"].items()}
    served = ServedMask("mask", keep, spec)
    target_only = WorkerReport("sglang::scheduler_TP0", 1, mask_digest=served.mask_digest, mask_layers=[1, 2], kept=16)
    assert fail_closed._problem(target_only, served) is None, "without a draft model the target's layers suffice"
    problem = fail_closed._problem(target_only, served, draft_model=True)
    assert problem and problem.endswith(f"expected {served.mask_digest} on layers [1, 2, 3]")
    with_draft = dataclasses.replace(target_only, mask_layers=[1, 2, 3], kept=24)
    assert fail_closed._problem(with_draft, served, draft_model=True) is None
