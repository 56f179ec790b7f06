"""Every format easyep_sglang.core.datasets_io reads calibrates, through a real server, to the statistics of the same
samples prefilled directly (so also to today's JSONL); a response longer than the server takes is cut to fit.

The server is the pool's plain Qwen3-MoE, which test_calibrate.py uses just before (this file sorts after it): it
prefills a sample in one chunk (chunked prefill 1024, no prefix cache); DeepSeek's takes chunks of 16, and a
4,000-token sample would cost minutes."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from easyep_sglang.core.stats import ExpertStats
from easyep_sglang.serving import calibrate
from easyep_sglang.serving.calibrate import ServerClient, collect
from easyep_sglang.serving.calibration_data import Sample
from test_data_formats import PAIRS, write_formats

CALIBRATING = "plain:qwen3_moe/fp32"


@pytest.mark.servers(CALIBRATING)
def test_every_format_calibrates_to_the_same_statistics(servers, tmp_path):
    """Each format through the CLI gives the statistics of the same samples tokenized and prefilled directly, the
    paper's input/output layout (a saved Arrow dataset among them) and a split of a saved DatasetDict included."""
    server = servers.use(CALIBRATING)
    pairs = PAIRS[:2]  # a prefill costs about 2 s on the CPU: two samples per format
    tokenizer = AutoTokenizer.from_pretrained(server.model_path)
    samples = [Sample(tuple(tokenizer(p)["input_ids"]), tuple(tokenizer(r, add_special_tokens=False)["input_ids"]))
               for p, r in pairs]
    reference, _ = collect(ServerClient(server.base_url), server.stats_dir, samples, progress=False)
    today = tmp_path / "today.jsonl"
    today.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    cases = {"prompt/response jsonl": (today, None)}
    cases |= {f"input/output {name}": case for name, case in
              write_formats([{"input": p, "output": r} for p, r in pairs], tmp_path / "io").items()}
    for name, (path, split) in cases.items():
        out = tmp_path / "stats" / f"{name.replace('/', '-').replace(' ', '-')}.safetensors"
        calibrate.main(["--model-path", str(server.model_path), "--prompts", str(path), "--domain", "d", "--out", str(out),
                        "--use-responses", "--num-samples", str(len(pairs)), "--base-url", server.base_url,
                        "--stats-dir", str(server.stats_dir), *(["--split", split] if split else [])])
        stats, provenance = ExpertStats.load(out)
        assert torch.equal(stats.tokens, reference.tokens), name
        assert torch.equal(stats.sums, reference.sums), (name, (stats.sums - reference.sums).abs().max())
        assert provenance["prompts"]["count"] == len(pairs) and provenance["prompts"]["split"] == split


@pytest.mark.servers(CALIBRATING)
def test_a_response_longer_than_the_server_takes_is_cut_to_fit(servers, tmp_path, capsys):
    server = servers.use(CALIBRATING)
    client = ServerClient(server.base_url)
    limit = client.max_input_tokens()
    data = tmp_path / "r1.jsonl"
    data.write_text(json.dumps({"input": "Q: 1+1? A:", "output": " 2" * 2500}) + "\n")  # 5000 tokens > 4096
    out = tmp_path / "stats.safetensors"
    calibrate.main(["--model-path", str(server.model_path), "--prompts", str(data), "--domain", "d", "--out", str(out),
                    "--use-responses", "--truncate-responses", "--base-url", server.base_url,
                    "--stats-dir", str(server.stats_dir)])
    stats, _ = ExpertStats.load(out)
    prompt_tokens = len(AutoTokenizer.from_pretrained(server.model_path)("Q: 1+1? A:")["input_ids"])
    assert 0 < limit < 4096 and stats.tokens.tolist() == [limit] * len(stats.layer_ids)
    assert (f"truncated the responses of 1 of 1 samples to fit the {limit} tokens of the server's longest input: "
            f"{prompt_tokens + 5000 - limit} response tokens dropped") in capsys.readouterr().err
