"""The trained demo MoE: deterministic held-out-safe data, a training smoke run, and the shipped weights."""

import dataclasses
import json
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
import transformers

from easyep_sglang.demo.trained import corpus, evaluate, sets, train

DATA_DIR = Path(__file__).resolve().parent.parent / "easyep_sglang" / "data"
SHIPPED_MODEL, SHIPPED_SETS = DATA_DIR / "demo_moe", DATA_DIR / "demo_sets"
CORPUS_PYTHON = (3, 11)  # the Python whose stdlib the shipped model and sets were made from
SMOKE_OVERRIDES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, first_k_dense_replace=1,
    n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=32,
)


def test_corpus_is_deterministic_and_math_eval_is_held_out():
    first = list(islice(corpus.math_training_lines(seed=0), 200))
    assert first == list(islice(corpus.math_training_lines(seed=0), 200))
    corpus.domain_text.cache_clear()
    prose = corpus.passages("prose", True, 5, 256)
    corpus.domain_text.cache_clear()
    assert prose == corpus.passages("prose", True, 5, 256)

    eval_prompts = {p.prompt for p in corpus.math_eval_problems()}
    assert len(eval_prompts) == corpus.MATH_EVAL_ROWS
    trained_prompts = {line.rsplit(" ", 1)[0] for line in islice(corpus.math_training_lines(seed=0), 30_000)}
    assert not eval_prompts & trained_prompts
    assert not eval_prompts & {p.prompt for p in corpus.math_calib_problems()}
    assert set(corpus._split_files(True)).isdisjoint(corpus._split_files(False))


def test_training_smoke_run_writes_a_checkpoint_transformers_loads(tmp_path):
    config = dataclasses.replace(
        train.TrainConfig(), minutes=None, steps=3, batch_size=2, seq_len=32, warmup_steps=1, log_every=1,
        model_overrides=tuple(SMOKE_OVERRIDES.items()),
    )
    out_dir = tmp_path / "model"
    provenance = train.write_trained_model(config, out_dir, math_problems=4, passages=2)
    assert provenance["steps"] == 3 and provenance["tokens_seen"] == 3 * 2 * 32
    assert json.loads((out_dir / "easyep_build.json").read_text())["recipe_sha256"] == train.recipe_hash()
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.config.n_routed_experts == 8
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.bfloat16 and gate.e_score_correction_bias.dtype == torch.float32
    assert gate.e_score_correction_bias.abs().sum() > 0  # the load-balancing update ran


def test_shipped_sets_are_what_the_recipe_writes(tmp_path):
    # Code and prose are read from the running interpreter's standard library, which differs between versions.
    same_stdlib = sys.version_info[:2] == CORPUS_PYTHON
    for path in sets.write_sets(tmp_path):
        if path.name.startswith("math") or same_stdlib:
            assert path.read_text() == (SHIPPED_SETS / path.name).read_text(), f"rerun: python -m {sets.__name__} --out {SHIPPED_SETS}"


def test_shipped_model_matches_the_recipe_and_answers_math():
    provenance = json.loads((SHIPPED_MODEL / "easyep_build.json").read_text())
    assert provenance["recipe_sha256"] == train.recipe_hash(), (
        f"the recipe changed since the shipped model was trained; retrain: python -m {train.__name__} --out {SHIPPED_MODEL}"
    )
    assert provenance["math_exact_match"] >= 0.30

    model = transformers.AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL, dtype=torch.bfloat16).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    rows = [json.loads(line) for line in (SHIPPED_SETS / "math_eval.jsonl").read_text().splitlines()]
    problems = [corpus.MathProblem(*_parse(row["problem"])) for row in rows]
    assert [p.answer for p in problems] == [row["answer"] for row in rows]
    exact_match = evaluate.math_exact_match(model, tokenizer, problems)
    assert exact_match == pytest.approx(provenance["math_exact_match"], abs=0.05)


def _parse(prompt: str) -> tuple[int, str, int]:
    expression = prompt.removeprefix("Q: ").removesuffix("=? A:")  # "37+48"
    operator = "+" if "+" in expression else "-"
    left, right = expression.split(operator)
    return int(left), operator, int(right)


def test_bundled_mask_is_what_the_pipeline_selects_from_the_shipped_statistics(tmp_path):
    from easyep_sglang.core import selection as select
    from easyep_sglang.core.mask import ExpertMask
    from easyep_sglang.core.spec import spec_from_model_path
    from easyep_sglang.demo.server import DEMO_MASK

    out = tmp_path / "mask.json"
    select.main(["--stats", str(DATA_DIR / "demo_stats_math.safetensors"), "--method", "easy_ep", "--keep", "16",
                 "--model-path", str(SHIPPED_MODEL), "--out", str(out)])
    bundled, selected = ExpertMask.load(DEMO_MASK), ExpertMask.load(out)
    assert bundled.keep == selected.keep, "rerun the commands in python -m easyep_sglang.demo --help"
    assert {l: len(ids) for l, ids in bundled.resolve(spec_from_model_path(SHIPPED_MODEL)).items()} == {1: 16, 2: 16, 3: 16, 4: 16}
