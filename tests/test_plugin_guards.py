"""The plugin's worker-side code on real SGLang objects, with a published SGLang config and no server:
padded rows under --prune (topk id -1), --prune under a MoE runner that routes inside its kernel, the EPLB note
of the mask's log line, the recorder's DP-attention check."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.moe.topk import TopK
from sglang.srt.runtime_context import get_context

from easyep_sglang.sglang_plugin import expert_prune, gate_mask, stats_recorder
from easyep_sglang.sglang_plugin.serving_plan import serving_plan
from easyep_sglang.sglang_plugin.settings import PluginSettings

CONFIG = {"architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 2, "hidden_size": 8, "vocab_size": 32,
          "intermediate_size": 16, "moe_intermediate_size": 8, "n_routed_experts": 16, "num_experts_per_tok": 4,
          "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2, "topk_method": "noaux_tc",
          "scoring_func": "sigmoid", "n_shared_experts": 1}
KEPT = [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 15]  # layer 1; splits every group, keeps the last expert


@pytest.fixture
def worker(tmp_path, monkeypatch):
    """What a worker sees after load_model: a model with a real TopK, a plan from the launcher's environment."""
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "mask.json").write_text(json.dumps({"keep": {"1": KEPT}}))
    for key, value in PluginSettings(mask=tmp_path / "mask.json", prune=True).to_env().items():
        monkeypatch.setenv(key, value)
    serving_plan.cache_clear()
    with get_context().override_server_args(model_path=str(tmp_path)), torch.compiler.set_stance("force_eager"):
        model = torch.nn.Module()
        model.bias = torch.nn.Parameter(torch.zeros(16), requires_grad=False)
        model.topk = TopK(4, layer_id=1, use_grouped_topk=True, topk_group=2, num_expert_group=4, renormalize=True,
                          scoring_func="sigmoid", correction_bias=model.bias)
        yield SimpleNamespace(model=model, is_draft_worker=False, model_config=SimpleNamespace(model_path=str(tmp_path)))
    serving_plan.cache_clear()


def test_padded_rows_keep_topk_id_minus_one_under_prune(worker):
    gate_mask._after_load_model(None, worker)
    expert_prune._attach_id_maps(None, worker)
    topk = worker.model.topk
    logits = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))  # [T, E]
    # SGLang's own padding: rows past num_token_non_padded get id -1 (select_experts' post-processing)
    out = topk.forward_native(torch.zeros(6, 8), logits, num_token_non_padded=torch.tensor(4))
    assert (out.topk_ids[4:] == -1).all() and (out.topk_ids[:4] >= 0).all()
    local = expert_prune._to_local_expert_ids(out, topk).topk_ids  # [T, k]
    assert (local[4:] == -1).all(), "a padded row was mapped to the last kept expert"
    assert torch.equal(torch.tensor(KEPT)[local[:4].long()], out.topk_ids[:4].long())


def test_prune_refuses_a_runner_backend_that_routes_inside_its_kernel(worker):
    """SGLang binds the TopK to its experts' runner backend; triton_kernel (like flashinfer_trtllm on Blackwell,
    which --moe-runner-backend auto may pick) hands the kernel raw logits, so no chosen id reaches the plugin."""
    from sglang.srt.layers.moe.utils import MoeRunnerBackend

    worker.model.topk.bind_runner_backend(MoeRunnerBackend.TRITON_KERNELS, routing_method_type=None)
    with pytest.raises(RuntimeError, match="routes inside its kernel .TRITON_KERNEL top-k output.*--moe-runner-backend triton"):
        expert_prune._attach_id_maps(None, worker)


def test_mask_log_line_says_pruned_experts_keep_their_physical_slots_under_eplb(worker, caplog):
    with caplog.at_level(logging.INFO, logger="easyep"):
        gate_mask._after_load_model(None, worker)
    assert "12/16 experts kept" in caplog.text and "physical" not in caplog.text
    caplog.clear()
    with get_context().override_server_args(model_path=worker.model_config.model_path, enable_eplb=True):
        with caplog.at_level(logging.INFO, logger="easyep"):
            gate_mask._after_load_model(None, worker)
    assert "masked experts are never chosen but still occupy physical expert slots" in caplog.text


def test_recorder_refuses_attention_dp_from_the_resolved_parallel_settings():
    with get_context().override_server_args(tp_size=2, attn_dp_size=2) as server_args:
        assert not server_args.enable_dp_attention  # the deprecated raw field the recorder used to read
        problems = stats_recorder._unsupported(server_args, [], 16)
    assert any("DP attention is on (attention DP size 2); calibrate with --attn-dp-size 1" in p for p in problems)
    with get_context().override_server_args() as server_args:
        assert stats_recorder._unsupported(server_args, [], 16) == []
