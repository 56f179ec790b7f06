"""SGLang 0.5.23's own top-k implementations, run on the CPU with our mask applied as the plugin applies it.

Sigmoid routers: gate_mask.apply_mask sets the pruned experts' correction bias of a real SGLang TopK to
PRUNED_BIAS. Softmax routers: apply_mask marks them, and the plugin's BEFORE hook on TopK.forward sets their
logits to -inf. Every mask splits groups and passes mask.check_group_reachability; the pruned experts get
the largest logits, yet none may be chosen, and the weights stay finite and renormalised. The Triton router
(moe_fused_gate) runs under TRITON_INTERPRET=1 in a subprocess: the flag must be set before it is imported.
"""

import os
import random
import subprocess
import sys

import pytest
import torch
from sglang.srt.layers.moe import topk as sglang_topk
from sglang.srt.runtime_context import get_context

from easyep_sglang.core.mask import ExpertMask, MaskError
from easyep_sglang.core.spec import spec_from_config
from easyep_sglang.sglang_plugin import gate_mask

LAYER, TOKENS = 1, 48
V3 = {"architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 2, "hidden_size": 8, "vocab_size": 32,
      "intermediate_size": 16, "moe_intermediate_size": 8, "n_routed_experts": 16, "num_experts_per_tok": 4,
      "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2, "topk_method": "noaux_tc",
      "scoring_func": "sigmoid", "n_shared_experts": 1, "routed_scaling_factor": 2.5}
V2 = {**V3, "architectures": ["DeepseekV2ForCausalLM"], "topk_method": "group_limited_greedy", "scoring_func": "softmax"}
QWEN3 = {"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 2, "hidden_size": 8, "vocab_size": 32,
         "intermediate_size": 16, "moe_intermediate_size": 8, "num_experts": 16, "num_experts_per_tok": 4,
         "decoder_sparse_step": 1, "mlp_only_layers": [0]}


@pytest.fixture(scope="module", autouse=True)
def sglang_config():
    """A published SGLang config (TopK reads it) and eager torch (skips inductor compiles of the routers)."""
    with get_context().override_server_args(), torch.compiler.set_stance("force_eager"):
        yield


def split_masks(spec, count, seed=0):
    """Random kept sets that split at least one group and that the server would accept."""
    rng, masks = random.Random(seed), []
    while len(masks) < count:
        kept = sorted(rng.sample(range(spec.n_experts), rng.randint(spec.top_k, spec.n_experts - 2)))
        sizes = {sum(spec.group_of(e) == g for e in kept) for g in range(spec.n_group)}
        if spec.n_group > 1 and sizes <= {0, spec.group_size}:
            continue
        try:
            ExpertMask.for_spec(spec, {LAYER: kept}, "test").resolve(spec)
        except MaskError:
            continue
        masks.append(kept)
    return masks


def masked_router(config, kept):
    """A real SGLang TopK for `config`'s router, masked by the plugin's own apply_mask."""
    spec = spec_from_config(config)
    model = torch.nn.Module()
    grouped = dict(use_grouped_topk=True, topk_group=spec.topk_group, num_expert_group=spec.n_group) if spec.n_group > 1 else {}
    if config.get("scoring_func") == "sigmoid":
        model.bias = torch.nn.Parameter(torch.zeros(spec.n_experts), requires_grad=False)  # e_score_correction_bias
        model.topk = sglang_topk.TopK(spec.top_k, layer_id=LAYER, renormalize=True, scoring_func="sigmoid",
                                      correction_bias=model.bias, routed_scaling_factor=2.5, **grouped)
    else:
        model.weight = torch.nn.Parameter(torch.zeros(spec.n_experts, 8), requires_grad=False)  # the gate
        model.topk = sglang_topk.TopK(spec.top_k, layer_id=LAYER, renormalize=True, scoring_func="softmax", **grouped)
    assert gate_mask.apply_mask(model, spec, {LAYER: tuple(kept)}) == [LAYER]
    return spec, model.topk


def adversarial_logits(spec, kept, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(TOKENS, spec.n_experts, generator=generator)  # [T, E]
    pruned = [e for e in range(spec.n_experts) if e not in kept]
    logits[:, pruned] += 4.0  # without the mask the pruned experts would win
    return logits


def hooked_logits(topk, logits):
    """The router logits after the plugin's BEFORE hook on TopK.forward (unchanged for sigmoid routers)."""
    hooked = gate_mask._mask_router_logits(topk, torch.zeros(len(logits), 8), logits)
    return logits if hooked is None else hooked[0][2]


def assert_only_kept(topk_weights, topk_ids, kept, top_k):
    assert topk_ids.shape == (TOKENS, top_k)
    assert torch.isin(topk_ids, torch.tensor(kept)).all(), "a pruned expert was chosen"
    assert all(len(set(row)) == top_k for row in topk_ids.tolist())
    assert torch.isfinite(topk_weights).all() and (topk_weights >= 0).all()
    torch.testing.assert_close(topk_weights.sum(dim=-1), torch.ones(TOKENS))


@pytest.mark.parametrize("config", [V3, V2, QWEN3], ids=["sigmoid-bias-grouped", "softmax-grouped", "softmax"])
def test_topk_forward_native_never_chooses_a_pruned_expert(config):
    """TopK.forward_native -> select_experts -> biased_grouped_topk_gpu (-> biased_grouped_topk_impl off CUDA),
    grouped_topk_gpu, or fused_topk_torch_native."""
    for seed, kept in enumerate(split_masks(spec_from_config(config), 25)):
        spec, topk = masked_router(config, kept)
        hidden = torch.zeros(TOKENS, 8)
        out = topk.forward_native(hidden, hooked_logits(topk, adversarial_logits(spec, kept, seed)))
        assert_only_kept(out.topk_weights, out.topk_ids, kept, spec.top_k)


def test_biased_grouped_topk_impl_and_the_reachability_rule_is_tight():
    spec = spec_from_config(V3)
    hidden = torch.zeros(TOKENS, 8)
    for seed, kept in enumerate(split_masks(spec, 25, seed=1)):
        _, topk = masked_router(V3, kept)
        bias = topk.topk_config.correction_bias  # [E], PRUNED_BIAS on pruned experts
        weights, ids = sglang_topk.biased_grouped_topk_impl(
            hidden, adversarial_logits(spec, kept, seed), bias, spec.top_k, True, spec.n_group, spec.topk_group)
        assert_only_kept(weights, ids, kept, spec.top_k)
    # One kept expert per group: the rule refuses it, and SGLang's router does fall back to pruned experts.
    kept = [0, 4, 8, 12]
    with pytest.raises(MaskError, match="holding only 2 kept experts < top_k=4"):
        ExpertMask.for_spec(spec, {LAYER: kept}, "test").resolve(spec)
    bias = torch.full((spec.n_experts,), gate_mask.PRUNED_BIAS).index_fill_(0, torch.tensor(kept), 0.0)  # [E]
    _, ids = sglang_topk.biased_grouped_topk_impl(
        hidden, adversarial_logits(spec, kept, 0), bias, spec.top_k, True, spec.n_group, spec.topk_group)
    assert not torch.isin(ids, torch.tensor(kept)).all()


TRITON_DRIVER = """
import sys, torch
from sglang.kernels.ops.moe.moe_fused_gate import moe_fused_gate
cases = torch.load(sys.argv[1])
torch.save([moe_fused_gate(c.pop("logits"), c.pop("bias"), c.pop("topk"), renormalize=True, **c) for c in cases], sys.argv[2])
"""


def test_triton_moe_fused_gate_under_the_interpreter(tmp_path):
    """The Triton router of CUDA: biased_grouped_topk_gpu's grouped fallback (flashinfer unavailable or
    SGLANG_OPT_USE_JIT_KERNEL_GROUPED_TOPK) and fused_topk's softmax route (layers/moe/topk.py)."""
    cases, expected = [], []
    for config, n in ((V3, 6), (QWEN3, 3)):
        for seed, kept in enumerate(split_masks(spec_from_config(config), n, seed=2)):
            spec, topk = masked_router(config, kept)
            logits = hooked_logits(topk, adversarial_logits(spec, kept, seed))
            sigmoid = config is V3
            cases.append({"logits": logits, "bias": topk.topk_config.correction_bias.detach() if sigmoid else None,
                          "topk": spec.top_k, "scoring_func": "sigmoid" if sigmoid else "softmax",
                          "num_expert_group": spec.n_group, "topk_group": spec.topk_group})
            expected.append((kept, spec.top_k))
    torch.save(cases, tmp_path / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", TRITON_DRIVER, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True, timeout=300, capture_output=True)
    outputs = torch.load(tmp_path / "out.pt")
    assert len(outputs) == len(expected)
    for (weights, ids), (kept, top_k) in zip(outputs, expected):
        assert_only_kept(weights, ids, kept, top_k)
