"""What the reproduction measures on one served model: losses from SGLang's own input-token logprobs, and
greedy exact match through the accuracy harness (easyep_sglang.eval.accuracy) over the OpenAI API.

Losses are natural-log negative log-likelihoods per token, token-weighted over a set:
    loss = sum over scored tokens t of -log p(x_t | x_<t) / number of scored tokens
- domain loss: every token of each eval text but the first (BOS, which has no prediction);
- answer loss: only the answer's tokens, given the problem ("Q: 37+48=? A:" then " 85").
One /generate call per batch returns `meta_info.input_token_logprobs` ([logprob, token_id, text] per input
token, the first logprob None) with `logprob_start_len: 0`; SGLang then serves no prompt token from its
prefix cache, so every logprob is computed by the served (masked) model.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from easyep_sglang.eval import accuracy
from easyep_sglang.eval.provenance import append_row, provenance
from easyep_sglang.serving.server_process import LaunchedServer

LOGPROB_BATCH = 16  # sequences per /generate call


@dataclass(frozen=True)
class Scored:
    token_ids: tuple[int, ...]  # the whole sequence sent to the server
    start: int  # index of the first scored token (>= 1)


@dataclass(frozen=True)
class EvalSets:
    math_data: Path  # {problem, answer} JSONL the accuracy harness reads
    answers: list[Scored]  # the same problems, answer tokens scored
    texts: dict[str, list[Scored]]  # domain -> eval texts


def nll_sum(logprobs: list[float | None], start: int) -> tuple[float, int]:
    """(sum of -logprob, count) over positions >= start; a None logprob (the first token) is never scored."""
    scored = [lp for lp in logprobs[start:] if lp is not None]
    return -sum(scored), len(scored)


def input_logprobs(response: dict) -> list[float | None]:
    """The logprob of every input token from one /generate result ([logprob, token_id, text] entries)."""
    return [entry[0] for entry in response["meta_info"]["input_token_logprobs"]]


def mean_nll(responses: list[dict], items: list[Scored]) -> float:
    """Token-weighted mean NLL of `items` given their /generate results (same order)."""
    assert len(responses) == len(items)
    total, count = 0.0, 0
    for response, item in zip(responses, items):
        logprobs = input_logprobs(response)
        if len(logprobs) != len(item.token_ids):
            raise RuntimeError(f"the server returned {len(logprobs)} input logprobs for {len(item.token_ids)} tokens")
        s, n = nll_sum(logprobs, item.start)
        total, count = total + s, count + n
    if count == 0:
        raise ValueError("no tokens to score; give texts longer than one token")
    return total / count


def generate_logprobs(base_url: str, items: list[Scored], timeout: float = 600) -> list[dict]:
    """One prefill per item (max_new_tokens=1) with every input token's logprob; /generate results in order."""
    responses = []
    for start in range(0, len(items), LOGPROB_BATCH):
        batch = items[start : start + LOGPROB_BATCH]
        body = {"input_ids": [list(item.token_ids) for item in batch],
                "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                "return_logprob": True, "logprob_start_len": 0}
        request = urllib.request.Request(base_url.rstrip("/") + "/generate", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            responses += json.load(resp)
    return responses


def text_items(tokenizer, texts: list[str], max_tokens: int) -> list[Scored]:
    """Each text from its BOS, cut to `max_tokens` tokens; every token after the first is scored."""
    items = [Scored(tuple(tokenizer(text)["input_ids"][:max_tokens]), 1) for text in texts]
    return [item for item in items if len(item.token_ids) > 1]


def answer_continuation(problem: str, answer: str) -> str:
    """The text that follows the problem when the model states the answer: "A:" + " 85"."""
    return answer if problem[-1:].isspace() else " " + answer


def answer_items(tokenizer, problems: list[accuracy.Problem]) -> list[Scored]:
    """Problem tokens (with BOS) then answer tokens, tokenised apart so the answer's tokens are exactly known."""
    items = []
    for p in problems:
        prompt = tokenizer(p.problem)["input_ids"]
        answer = tokenizer(answer_continuation(p.problem, p.answer), add_special_tokens=False)["input_ids"]
        items.append(Scored(tuple(prompt + answer), len(prompt)))
    return items


def exact_match(base_url: str, model_name: str, data: Path, mask: Path | None, max_tokens: int, out: Path) -> dict:
    """Greedy (T=0, n=1) exact match through the accuracy harness; its full row is appended to `out`."""
    row = accuracy.evaluate(accuracy.AccuracyConfig(
        base_url, model_name, out, data=data, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens, prompt_suffix="",
        api="completions", stop=["\n"], concurrency=8, seed=0, mask=mask, quiet=True))
    append_row(out, row)
    return {"exact_match": row["pass@1"], "exact_match_errors": row["errors"], "num_problems": row["num_problems"],
            "exact_match_s": row["duration_s"]}


def measure(server: LaunchedServer, model_path: Path, mask: Path | None, sets: EvalSets, max_answer_tokens: int,
            accuracy_out: Path) -> dict:
    """Provenance, exact match, answer loss and per-domain loss of one running server."""
    started = time.monotonic()
    facts = provenance(server.base_url, mask_path=mask, model_path=model_path)
    metrics = exact_match(server.base_url, str(model_path), sets.math_data, mask, max_answer_tokens, accuracy_out)
    metrics["answer_loss"] = mean_nll(generate_logprobs(server.base_url, sets.answers), sets.answers)
    metrics["loss"] = {d: mean_nll(generate_logprobs(server.base_url, items), items) for d, items in sets.texts.items()}
    return {**facts, **metrics, "eval_s": round(time.monotonic() - started, 1)}


def serve_in_turn(model_path: Path, masks: list[Path | None], server_args: list[str], env: dict, log_dir: Path,
                  ahead: int = 1) -> Iterator[tuple[Path | None, LaunchedServer, float]]:
    """Yield (mask, started server, startup seconds) for each mask (None: the full model), one after another.

    Up to `ahead` later servers start in background threads while the caller uses the current one, so 20-40 s
    startups overlap measurements (0: strictly one server at a time). Every server is stopped by PID, on
    errors too. Servers start from the pool's worker threads, which live until every server is stopped
    (LaunchedServer's parent-death signal follows the thread that started the process)."""
    def launch(mask: Path | None) -> tuple[LaunchedServer, float]:
        server = LaunchedServer(model_path, mask=mask, extra_args=server_args, env=env,
                                log_path=log_dir / f"{mask.stem if mask else 'full'}.log")
        started = time.monotonic()
        try:
            server.start()
        except BaseException:
            server.stop()
            raise
        return server, round(time.monotonic() - started, 1)

    pending: deque = deque()  # futures of the next servers, in mask order
    submitted = 0

    def fill(count: int) -> None:
        nonlocal submitted
        while submitted < len(masks) and len(pending) < count:
            pending.append(pool.submit(launch, masks[submitted]))
            submitted += 1

    with ThreadPoolExecutor(max_workers=max(1, ahead)) as pool:
        try:
            for mask in masks:
                fill(max(1, ahead))
                server, startup_s = pending.popleft().result()
                try:
                    fill(ahead)
                    yield mask, server, startup_s
                finally:
                    server.stop()
        finally:
            for future in pending:  # started ahead and never used: wait for each, then stop it
                try:
                    future.result()[0].stop()
                except Exception:
                    pass
