"""Offline-pruned checkpoints with a next-n (MTP) layer in SGLang 0.5.23 itself (issue 10, item 2).

SGLang's NEXTN speculative decoding does not run on this CPU (the launcher refuses it: serving/launch_checks.py
check_cpu_settings); a real server loads target and draft, then stops in the draft worker's setup. So the draft
model is built the way a draft worker builds it, in a separate process (sglang_worker.py): the launcher's own
server arguments (launch.prepare, which adds --json-model-override-args for a plugin-served checkpoint) are parsed
by SGLang's prepare_server_args, SGLang loads its plugins (ours among them), and SGLang's model loader builds
`DeepseekV3ForCausalLMNextN` from the checkpoint under draft_model_build_scope. The target model is loaded the
same way. The loaded MoE weights of the draft are then compared with the source checkpoint's MTP layer,
computed here with torch indexing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import greedy
from safetensors.torch import load_file
from server_specs import MASKS

from easyep_sglang.checkpoint.prune import prune_checkpoint
from easyep_sglang.checkpoint.pruned_checkpoint import read_pruned_checkpoint
from easyep_sglang.serving.launch import prepare

ROOT = Path(__file__).resolve().parents[1]
MTP = 3
PROMPTS = ["Q: 37+48=? A:", "def add(a, b):\n    return"]
DRAFT_FLAGS = ["--speculative-algorithm", "NEXTN", "--speculative-num-steps", "1", "--speculative-eagle-topk", "1",
               "--speculative-num-draft-tokens", "2"]

# Runs in its own process, with the launcher's environment (CPU stand-in first on PYTHONPATH, our plugin's
# settings): argv = [launch_server arguments as JSON, output .safetensors]. Prints a JSON line
# {"target": "ok" | error, "draft": "ok" | error} and saves the draft's MoE parameters.
LOAD_AS_A_WORKER = r"""
import json, sys
sys.path.insert(0, "tests")
from safetensors.torch import save_file
from sglang_worker import Worker

worker = Worker(sys.argv[1])
result = {}
for role, is_draft in (("target", False), ("draft", True)):
    try:
        model = worker.load(is_draft)
        result[role] = "ok"
    except Exception as err:
        result[role] = f"{type(err).__name__}: {err}"
        continue
    if is_draft:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if ".mlp." in n}, sys.argv[2])
print(json.dumps(result))
"""


def load_in_sglang(model: Path, tmp_path: Path, *launcher_args: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(what loaded, the draft's MoE parameters) for `model` served by our launcher with NEXTN, whose flags SGLang
    reads unchanged (the launcher itself refuses them on a CPU, where the draft cannot run)."""
    argv, env = prepare(["--model-path", str(model), "--device", "cpu", "--dtype", "float32", *launcher_args])
    argv += DRAFT_FLAGS
    out = tmp_path / "draft_moe.safetensors"
    out.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-c", LOAD_AS_A_WORKER, json.dumps(argv), str(out)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result, (load_file(out) if out.exists() else {})


def expected_draft_moe(source: Path, ids: list[int]) -> dict[str, torch.Tensor]:
    """The source MTP layer's router and experts, restricted to `ids` in that order, as SGLang's FusedMoE holds
    them: w13 [E, 2I, H] (gate rows, then up), w2 [E, H, I]."""
    t = load_file(source / "model.safetensors")
    p = f"model.layers.{MTP}.mlp."
    expert = lambda e, name: t[f"{p}experts.{e}.{name}.weight"]  # noqa: E731
    return {
        "model.decoder.mlp.gate.weight": t[f"{p}gate.weight"][ids],
        "model.decoder.mlp.gate.e_score_correction_bias": t[f"{p}gate.e_score_correction_bias"][ids],
        "model.decoder.mlp.experts.w13_weight": torch.stack([torch.cat([expert(e, "gate_proj"), expert(e, "up_proj")])
                                                              for e in ids]),
        "model.decoder.mlp.experts.w2_weight": torch.stack([expert(e, "down_proj") for e in ids]),
    }


# how the MTP model is served -> (mask, stock_engine of its offline-pruned checkpoint or None for --prune,
# the MTP layer's experts the draft must hold, in new-id order)
SERVED = {
    "offline-exact": ("deepseek_v3_mtp/whole", "exact", MASKS["deepseek_v3_mtp/whole"][MTP]),  # MTP pruned too
    "offline-plugin-only": ("deepseek_v3/whole", "plugin-only", list(range(16))),  # MTP left out of the mask
    "load-time-prune": ("deepseek_v3/whole", None, list(range(16))),
}


@pytest.mark.parametrize("served", list(SERVED))
def test_the_nextn_draft_loads_what_is_served(model_store, tmp_path, served):
    """An `exact` checkpoint loads in stock SGLang (no easyep routing at work), target and draft; any other
    checkpoint makes stock SGLang refuse it at load, and our launcher's arguments load the draft with the full
    MTP layer, as they do under --prune."""
    mask, stock, mtp_ids = SERVED[served]
    source = model_store.model("deepseek_v3_mtp/fp32")
    if stock is None:
        loaded, draft = load_in_sglang(source, tmp_path, "--mask", str(model_store.mask(mask)), "--prune")
    else:
        pruned = prune_checkpoint(source, model_store.mask(mask), tmp_path / "pruned")
        loaded, draft = load_in_sglang(pruned, tmp_path)  # `exact`: stock SGLang, our plugin routes nothing
    assert loaded == {"target": "ok", "draft": "ok"}, loaded
    assert stock is None or read_pruned_checkpoint(pruned).stock_engine == stock
    want = expected_draft_moe(source, mtp_ids)
    assert set(want) <= set(draft)
    for name, tensor in want.items():
        assert torch.equal(draft[name], tensor.to(draft[name].dtype)), name
    if stock not in (None, "exact"):
        config = json.loads((pruned / "config.json").read_text())
        config.pop("easyep")  # as stock SGLang reads it: the block only tells our launcher how to serve it
        (pruned / "config.json").write_text(json.dumps(config))
        loaded, _ = load_in_sglang(pruned, tmp_path)
        assert loaded["target"].startswith("AssertionError: Attempted to load weight"), loaded


@pytest.mark.servers("mask:deepseek_v3/whole", "offline:deepseek_v3_mtp/whole")
def test_an_exact_checkpoint_with_an_mtp_layer_serves_in_stock_sglang(servers):
    """The pruned checkpoint's layers 0-2 are deepseek_v3/whole's: the same greedy tokens as the masked model."""
    masked = greedy(servers.use("mask:deepseek_v3/whole"), PROMPTS)
    server = servers.use("offline:deepseek_v3_mtp/whole")
    pruned = greedy(server, PROMPTS)
    assert [o["token_ids"] for o in pruned] == [o["token_ids"] for o in masked]
    for got, want in zip(pruned, masked):
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"])) < 1e-5
    log = (server.recorder_dir / "server.log").read_text()
    assert "easyep: mask on" not in log and "pruned offline" not in log, "exact: served without the plugin's routing"
