"""The calibration driver: input formats, every token counted exactly once (prefix cache on and off,
prefill chunks of 16 and 1024 tokens), the CLI against a running server, and a mask made from its
statistics served by the launcher (SGLang's own recorder is the witness that pruned experts are never chosen)."""

import json

import pytest
from transformers import AutoTokenizer

from conftest import ARCHS
from easyep_sglang.core import selection as select
from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.serving import calibrate
from easyep_sglang.serving.calibrate import Sample, ServerClient, collect
from easyep_sglang.serving.launch import prepare
from easyep_sglang.sglang_plugin.settings import PluginSettings
from expert_distribution import record_expert_counts
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.core.stats import ExpertStats
from server_pool import witnessed_server

PREFIX = "Q: What is 12 + 30? A: "
# Repeats and shared prefixes: without the flush before every prefill the prefix cache would serve them.
TEXTS = [PREFIX + "42", PREFIX + "42", PREFIX + "12 + 30 = 42.", "x" * 70 + " long enough for five prefill chunks"]


def test_read_prompts_formats_and_errors(tiny_models, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen3_moe"])
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond\n")
    assert calibrate.read_prompts(tmp_path / "p.txt") == [{"text": "first prompt"}, {"text": "second"}]
    lines = [{"text": "ab"}, {"prompt": "cd", "response": "ef"}, {"messages": [{"role": "user", "content": "hi"}]}]
    (tmp_path / "p.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    samples = calibrate.tokenize(calibrate.read_prompts(tmp_path / "p.jsonl"), tokenizer, use_responses=False)
    assert samples[0] == Sample(tuple(tokenizer("ab")["input_ids"]))  # BOS included, as SGLang tokenizes text
    assert samples[1].prompt_ids == tuple(tokenizer("cd")["input_ids"]) and samples[1].response_ids == ()
    chat = tokenizer.apply_chat_template(lines[2]["messages"], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert samples[2].prompt_ids == tuple(chat) and chat.count(tokenizer.bos_token_id) == 1
    with pytest.raises(ValueError, match="prompt 1 has no 'response' string"):
        calibrate.tokenize(lines, tokenizer, use_responses=True)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"answer": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl row 2 has no prompt: its 'text' is empty; .* --prompt-field"):
        calibrate.read_prompts(tmp_path / "bad.jsonl")
    short, long_, mid = Sample((1,)), Sample((1, 2, 3)), Sample((1, 2), (3,))
    assert calibrate.longest([short, long_, mid], 2) == [long_, mid]


def test_the_flags_map_onto_the_config_with_its_defaults():
    args, sglang_args = calibrate.build_parser().parse_known_args(["--model-path", "m", "--prompts", "p.jsonl",
                                                                   "--domain", "d", "--out", "s", "--dtype", "float32"])
    assert calibrate.CalibrationConfig(**vars(args)) == calibrate.CalibrationConfig("m", "p.jsonl", "d", "s")
    assert sglang_args == ["--dtype", "float32"]  # flags calibrate does not know go to SGLang


def test_launcher_record_stats_flag(tiny_models, tmp_path):
    argv, env = prepare(["--model-path", str(tiny_models["deepseek_v3"]), "--record-stats", str(tmp_path / "s")])
    assert PluginSettings.from_env(env) == PluginSettings(stats_dir=tmp_path / "s")
    assert env["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] == "0"
    assert "--disable-prefill-cuda-graph" in argv
    argv, env = prepare(["--model-path", str(tiny_models["deepseek_v3"])])
    assert PluginSettings.from_env(env) == PluginSettings() and "--disable-prefill-cuda-graph" not in argv


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.servers("plain:{arch}/fp32")
def test_each_token_counted_once(servers, arch):
    server = servers.use(f"plain:{arch}/fp32")
    spec = spec_from_model_path(server.model_path)
    tokenizer = AutoTokenizer.from_pretrained(server.model_path)
    samples = [Sample(tuple(tokenizer(text)["input_ids"])) for text in TEXTS]
    stats, _ = collect(ServerClient(server.base_url), server.stats_dir, samples, progress=False)
    total = sum(len(s.token_ids) for s in samples)
    assert stats.tokens.tolist() == [total] * len(spec.moe_layers)
    assert stats.frequency.sum(dim=1).tolist() == [total * spec.top_k] * len(spec.moe_layers)


@pytest.mark.servers("plain:deepseek_v3/fp32")
def test_decode_and_cached_tokens_are_not_counted(servers):
    """What the driver guards against: the same prompt again is served from the prefix cache (not
    computed, so not counted), and decode steps are never counted."""
    server = servers.use("plain:deepseek_v3/fp32")  # its prefix cache is on
    ids = AutoTokenizer.from_pretrained(server.model_path)(TEXTS[3])["input_ids"]
    client = ServerClient(server.base_url)
    assert client.flush_cache()
    client.expert_record("start")
    first, again = (client.generate([ids], [{"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}])[0]["meta_info"]
                    for _ in range(2))
    client.expert_record("stop")
    before = set(server.stats_dir.glob(calibrate.DUMP_GLOB))
    client.expert_record("dump")
    (dump,) = set(server.stats_dir.glob(calibrate.DUMP_GLOB)) - before
    stats, _ = ExpertStats.load(dump)
    assert first["cached_tokens"] == 0 and again["cached_tokens"] > 0 and first["completion_tokens"] == 8
    assert stats.tokens.tolist() == [2 * len(ids) - again["cached_tokens"]] * 2


@pytest.mark.servers("plain:deepseek_v3/fp32")
def test_cli_against_running_server_and_mask_from_its_statistics(servers, tmp_path):
    server = servers.use("plain:deepseek_v3/fp32")
    model = server.model_path
    spec = spec_from_model_path(model)
    prompts = tmp_path / "math.jsonl"
    records = [{"text": "Q: 7 * 6 = ? A:"}, {"prompt": "Q: 120 / 4 = ? A:"}, {"messages": [{"role": "user", "content": "2+2?"}]},
               {"text": "Q: 1 + 1 = ? A:"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out, mask = tmp_path / "stats" / "math.safetensors", tmp_path / "mask.json"
    calibrate.main(["--model-path", str(model), "--prompts", str(prompts), "--domain", "math", "--out", str(out),
                    "--num-samples", "3", "--max-new-tokens", "40", "--base-url", server.base_url,
                    "--stats-dir", str(server.stats_dir)])
    stats, provenance = ExpertStats.load(out)
    assert provenance["model"]["fingerprint"] == spec.fingerprint and provenance["model"]["architecture"] == spec.architecture
    assert provenance["domain"] == "math" and provenance["samples"] == 3 and provenance["prompts"]["count"] == 4
    assert provenance["sglang_version"] == "0.5.23" and provenance["package_version"]
    assert provenance["settings"] == {"num_samples": 3, "max_new_tokens": 40, "temperature": 0.6, "top_p": 0.95,
                                      "seed": 0, "use_responses": False}
    assert provenance["token_count"] == int(stats.tokens[0]) > 3 * 16, "prompts plus the model's answers"

    select.main(["--stats", str(out), "--method", "easy_ep", "--keep", "8", "--model-path", str(model), "--out", str(mask)])
    keep = ExpertMask.load(mask).resolve(spec)
    assert set(keep) == set(spec.moe_layers) and all(len(ids) == 8 for ids in keep.values())
    with witnessed_server(model, mask, ("--dtype", "float32"), tmp_path / "masked") as masked:
        def workload():
            for seed in range(3):
                ServerClient(masked.base_url).generate([[1, *range(40, 70)]], [{"max_new_tokens": 60, "temperature": 1.0,
                                                                                 "ignore_eos": True, "sampling_seed": seed}])

        counts = record_expert_counts(masked.base_url, masked.recorder_dir, workload)  # [num_layers, E]
    for layer, kept in keep.items():
        pruned = sorted(set(range(spec.n_experts)) - set(kept))
        assert counts[layer, pruned].sum() == 0, f"layer {layer}: pruned experts chosen {counts[layer].tolist()}"
        assert counts[layer, list(kept)].sum() >= 3 * 60 * spec.top_k, "the workload routes every token to kept experts"
