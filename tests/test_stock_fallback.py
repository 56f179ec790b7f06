"""The measurement of `python -m bench.micro.stock_fallback_routing`: stock transformers on a pruned checkpoint vs the masked
model.

An exact (whole-group) mask must show no differing routing decision; an approximate (uneven-group) mask
must give per-layer percentages, and on this model its group-blind fallback visibly changes routing.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench.micro.stock_fallback_measure import load_model, measure
from bench.micro.stock_fallback_routing import calibration_texts, token_chunks
from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.demo.tiny_models import build_tiny_model

# Default tiny DeepSeek-V3: 16 experts in 4 groups of 4, routing picks 2 groups then top-4; MoE layers 1, 2.
WHOLE_GROUPS = [0, 1, 2, 3, 8, 9, 10, 11]  # groups 0 and 2 -> stock n_group=2, topk_group=2: exact
UNEVEN = [0, 1, 2, 4, 5, 8, 9, 12]  # 3/2/2/1 per group -> stock n_group=1, topk_group=1: approximate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stock_fallback")
    model = build_tiny_model("deepseek_v3", root / "model", dtype="float32")
    from transformers import AutoTokenizer

    texts = calibration_texts(n_arith=12, source_chars=250)
    chunks = token_chunks(AutoTokenizer.from_pretrained(model), texts, seq_len=256)
    return root, model, spec_from_model_path(model), chunks, load_model(model)


def _measure(setup, name: str, ids: list[int]):
    root, model, spec, chunks, original = setup
    mask_path = root / f"{name}.json"
    ExpertMask.for_spec(spec, {layer: ids for layer in spec.moe_layers}, method=name).save(mask_path)
    return measure(model, mask_path, chunks, root / name, original=original)


def test_exact_mask_routes_identically(setup):
    _, _, spec, chunks, _ = setup
    m = _measure(setup, "whole-groups", WHOLE_GROUPS)
    assert m.stock_engine == "exact"
    assert m.n_tokens == sum(len(c) for c in chunks) > 300
    assert sorted(m.per_layer) == list(spec.moe_layers) == [1, 2]
    assert m.decisions_differ == 0 and m.decisions_pct == 0.0
    assert all(v == 0.0 for v in m.per_layer.values()) and all(v == 0.0 for v in m.rule_only.values())
    assert m.greedy_differ_pct == 0.0 and m.max_logprob_diff < 1e-4


def test_approximate_mask_reports_per_layer_differences(setup):
    _, _, spec, _, original = setup
    m = _measure(setup, "uneven", UNEVEN)
    assert m.stock_engine == "approximate"
    pruned_config = json.loads((setup[0] / "uneven" / "pruned" / "config.json").read_text())
    assert (pruned_config["n_group"], pruned_config["topk_group"]) == (1, 1)
    assert sorted(m.per_layer) == sorted(m.rule_only) == [1, 2]
    for value in (m.decisions_pct, m.rule_only_pct, m.greedy_differ_pct, *m.per_layer.values(), *m.rule_only.values()):
        assert 0.0 <= value <= 100.0
    # Plain top-4 over 8 kept experts ignores the 2-of-4 group limit: some first-layer decisions must differ,
    # or the measurement is blind. The first MoE layer sees the same input in both models, so the stock rule
    # applied to the masked model's logits predicts it.
    assert m.first_layer == 1 and m.per_layer[1] > 0.0
    assert m.per_layer[1] == pytest.approx(m.rule_only[1], abs=0.5)
    assert m.decisions_differ > 0 and 0.0 < m.experts_swapped <= spec.top_k
    # The masked model's biases were restored: the unmasked original still routes with its own biases.
    assert (original.model.layers[1].mlp.gate.e_score_correction_bias > -1.0).all()
