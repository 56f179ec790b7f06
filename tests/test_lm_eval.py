"""lm-evaluation-harness against a server launched with --mask: its OpenAI-compatible backends (local-completions,
local-chat-completions) on local tasks defined on local files, no hub access. Generation and log-likelihood
(multiple-choice) requests both run, and each answer lm-eval records equals what the same server returns to a
direct request: greedy text through /v1/completions and /v1/chat/completions, prompt logprobs through /generate."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from transformers import AutoTokenizer

MASKED = "mask:deepseek_v3/varying"
SUMS = [("Q: 37+48=? A:", 85), ("Q: 12+30=? A:", 42), ("Q: 9+9=? A:", 18), ("Q: 70-25=? A:", 45), ("Q: 6+7=? A:", 13)]
MAX_GEN_TOKS = 8
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{problem}}}}"
metadata:
  version: 1.0
"""
GENERATION = """output_type: generate_until
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
  temperature: 0
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
"""
CHOICE = """output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def write_tasks(folder) -> None:
    folder.mkdir()
    data = folder / "sums.jsonl"
    data.write_text("".join(json.dumps({"problem": p, "answer": str(a), "choices": [str(a + 1), str(a), str(a * 10)],
                                        "label": 1}) + "\n" for p, a in SUMS))
    for name, body in (("easyep_sums_gen", GENERATION.format(max_gen_toks=MAX_GEN_TOKS)), ("easyep_sums_choice", CHOICE)):
        (folder / f"{name}.yaml").write_text(TASK.format(name=name, data=data) + body)


def lm_eval(args: list[str], out) -> tuple[dict, dict[str, list[dict]], float]:
    """Run the lm_eval CLI offline; (results, samples by task, seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "lm_eval", *args, "--output_path", str(out), "--log_samples"],
                          env=env, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - began
    assert done.returncode == 0, done.stderr[-3000:]
    [results] = out.rglob("results_*.json")
    samples = {path.name.split("_20")[0].removeprefix("samples_"): [json.loads(l) for l in path.read_text().splitlines()]
               for path in out.rglob("samples_*.jsonl")}
    return json.loads(results.read_text())["results"], samples, seconds


def post(base_url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as resp:
        return json.load(resp)


def prompt_logprob(base_url: str, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from SGLang's native /generate: the input tokens' logprobs."""
    out = post(base_url, "/generate", {"input_ids": context + continuation, "return_logprob": True,
                                       "logprob_start_len": 0, "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    logprobs = out["meta_info"]["input_token_logprobs"]  # [(logprob, token_id, text)], the first logprob None
    return sum(lp for lp, _, _ in logprobs[len(context):])


@pytest.mark.servers(MASKED)
def test_lm_eval_completions_and_chat_against_a_masked_server(servers, tmp_path):
    server = servers.use(MASKED)
    model, url = str(server.model_path), server.base_url
    tokenizer = AutoTokenizer.from_pretrained(model)
    write_tasks(tmp_path / "tasks")
    common = ["--include_path", str(tmp_path / "tasks"), "--batch_size", "1"]
    model_args = f"model={model},tokenizer_backend=huggingface,tokenizer={model},max_retries=1"
    results, samples, completions_s = lm_eval(["--model", "local-completions", "--model_args",
                                               f"{model_args},base_url={url}/v1/completions",
                                               "--tasks", "easyep_sums_gen,easyep_sums_choice", *common],
                                              tmp_path / "completions")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # as lm-eval's API models do

    generated = {s["doc"]["problem"]: s["resps"][0][0] for s in samples["easyep_sums_gen"]}
    for problem, _ in SUMS:
        direct = post(url, "/v1/completions", {"model": model, "prompt": encode(problem), "max_tokens": MAX_GEN_TOKS,
                                                "temperature": 0, "stop": ["\n"]})
        assert generated[problem] == direct["choices"][0]["text"], problem
    exact = sum(generated[p].strip() == str(a) for p, a in SUMS) / len(SUMS)
    assert results["easyep_sums_gen"]["exact_match,strip"] == pytest.approx(exact)

    correct, worst = 0, 0.0
    for sample in samples["easyep_sums_choice"]:
        doc = sample["doc"]
        recorded = [float(resp[0][0]) for resp in sample["resps"]]  # one [loglikelihood, is_greedy] per choice
        context = encode(doc["problem"])
        direct = [prompt_logprob(url, context, encode(doc["problem"] + " " + choice)[len(context):])
                  for choice in doc["choices"]]
        assert recorded == pytest.approx(direct, abs=1e-3), doc["problem"]
        worst = max(worst, *(abs(a - b) for a, b in zip(recorded, direct)))
        correct += max(range(len(direct)), key=direct.__getitem__) == doc["label"]
    assert results["easyep_sums_choice"]["acc,none"] == pytest.approx(correct / len(SUMS))

    results, samples, chat_s = lm_eval(["--model", "local-chat-completions", "--model_args",
                                        f"model={model},base_url={url}/v1/chat/completions,max_retries=1",
                                        "--tasks", "easyep_sums_gen", "--apply_chat_template", *common],
                                       tmp_path / "chat")
    for sample in samples["easyep_sums_gen"]:
        problem = sample["doc"]["problem"]
        direct = post(url, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": problem}],
                                                     "max_tokens": MAX_GEN_TOKS, "temperature": 0, "stop": ["\n"]})
        assert sample["resps"][0][0] == direct["choices"][0]["message"]["content"], problem
    print(f"lm-eval wall time: completions {completions_s:.0f} s, chat {chat_s:.0f} s; log-likelihoods within {worst:.1e}")
