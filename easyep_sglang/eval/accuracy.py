"""pass@1 of a served model on maths problems: n samples per problem through the OpenAI-compatible API,
answers compared symbolically by math-verify.

    python -m easyep_sglang.accuracy --base-url URL --model NAME --data problems.jsonl --out report.jsonl \\
        [--n 5] [--temperature 0.6] [--top-p 0.95] [--max-tokens 32768] [--concurrency 8]

Data: rows {"problem": ..., "answer": ...}, or {"problem": ..., "solution": "... \\boxed{204}"} (AIME, HMMT) whose
last \\boxed{} is the answer, in any format easyep_sglang/core/datasets_io.py reads (JSONL, JSON, Parquet, Arrow, CSV,
a folder written by datasets' save_to_disk; --split, --problem-field, --answer-field);
easyep_sglang/data/tiny_math.jsonl is a bundled example.
Defaults follow the EASY-EP evaluation (DeepSeek-R1: 5 samples at temperature 0.6, top-p 0.95, up to
32k tokens; pass@1 = mean correctness over the samples). One report row per run, with the provenance
of the benchmark rows (easyep_sglang/eval/provenance.py), is appended to --out; it records the mask digest the server
reports, and a server that serves another mask than --mask names is refused before sampling.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from easyep_sglang.core.datasets_io import SUPPORTED, DataError, Rows, data_digest, load_rows
from easyep_sglang.eval.provenance import append_row, provenance

R1_MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
BUNDLED_DATA = Path(__file__).parents[1] / "data" / "tiny_math.jsonl"
TEXT_TAIL_CHARS = 1000  # of each completion kept in the report: enough to see the final answer
PROBLEM_FIELDS = ("problem", "question", "prompt", "input")
ANSWER_FIELDS = ("answer", "solution")  # the first the data has, unless --answer-field names one
SOLUTION_FIELDS = ("solution",)  # worked solutions: only their last \boxed{} is the answer
_AFTER_A = re.compile(r"A:[ \t]*([^\n]*)")


def extract_answer(text: str) -> str | None:
    r"""The answer a completion states, or None.

    1. The content of the last \boxed{...} (nested braces balanced), as DeepSeek-R1 is asked to write it.
    2. Otherwise the rest of the line after the last "A:", the format of few-shot "Q: ... A: 85" prompts
       such as our tiny demo data.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    matches = _AFTER_A.findall(text)
    return (matches[-1].strip() or None) if matches else None


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, nested braces balanced; None if there is none, or it is unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def is_correct(prediction: str | None, gold: str) -> bool:
    """math-verify's symbolic comparison; both sides are parsed as LaTeX maths ($...$)."""
    from math_verify import parse, verify

    if not prediction:
        return False
    as_math = lambda s: "$" + s.strip().strip("$") + "$"
    return bool(verify(parse(as_math(gold)), parse(as_math(prediction))))


@dataclass(frozen=True)
class AccuracyConfig:
    """One accuracy run: the API of this stage; every flag of build_parser() maps onto the field of its name.
    The sampling defaults are the EASY-EP evaluation's."""
    base_url: str
    model: str  # the served model's name
    out: str | Path  # main() appends the report row here; evaluate() returns it
    data: str | Path = str(BUNDLED_DATA)
    split: str | None = None
    problem_field: str | None = None
    answer_field: str | None = None
    n: int = 5  # samples per problem
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 32768
    concurrency: int = 8
    seed: int | None = None
    prompt_suffix: str = R1_MATH_SUFFIX
    api: str = "chat"  # or "completions"
    stop: list[str] | None = None
    mask: str | Path | None = None
    request_timeout: float = 3600
    quiet: bool = False


@dataclass(frozen=True)
class Problem:
    problem: str
    answer: str


def load_problems(path: str | Path, split: str | None = None, problem_field: str | None = None,
                  answer_field: str | None = None) -> list[Problem]:
    """The problems and their gold answers. The answer field is --answer-field, else the first of ANSWER_FIELDS
    the data has; a value holding \\boxed{} gives the content of its last one, and a solution must hold one."""
    rows = load_rows(path, split)
    problem = rows.pick("problem", PROBLEM_FIELDS, problem_field, "--problem-field")
    answer = rows.pick("answer", ANSWER_FIELDS, answer_field, "--answer-field")
    return [_problem(rows, n, row, problem, answer) for n, row in enumerate(rows.rows, 1)]


def _problem(rows: Rows, n: int, row: dict, problem: str, answer: str) -> Problem:
    where = f"{rows.source} row {n}"
    if not isinstance(row.get(problem), str) or not row[problem].strip():
        raise DataError(f"{where} has no {problem!r} text; fill it, or name the problem field with --problem-field")
    value = row.get(answer)
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or not str(value).strip():
        raise DataError(f"{where} has no {answer!r} answer; fill it, or name the answer field with --answer-field")
    gold = last_boxed(str(value)) if "\\boxed{" in str(value) or answer in SOLUTION_FIELDS else str(value).strip()
    if not gold:
        raise DataError(f"{where}: {answer!r} holds no complete \\boxed{{}} answer; fix the row, or name the field "
                        "that holds the final answer with --answer-field")
    return Problem(row[problem], gold)


def sample(client, config: AccuracyConfig, problem: Problem, seed: int | None) -> dict:
    """One completion; errors are recorded, not raised, so one bad request does not end the run.

    --api chat sends the problem as a user message (through the model's chat template); --api completions
    sends it as raw text, so the completion continues it and the answer is read from prompt + completion
    (a "Q: 37+48=? A:" prompt completed by " 85")."""
    prompt = problem.problem + config.prompt_suffix
    sampling = dict(model=config.model, temperature=config.temperature, top_p=config.top_p,
                    max_tokens=config.max_tokens, seed=seed, **({"stop": config.stop} if config.stop else {}))
    try:
        if config.api == "completions":
            response = client.completions.create(prompt=prompt, **sampling)
        else:
            response = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **sampling)
    except Exception as err:  # the openai client raises many types; the report keeps the message
        return {"error": f"{type(err).__name__}: {err}"[:500]}
    choice = response.choices[0]
    text = (choice.text if config.api == "completions" else choice.message.content) or ""
    answered = prompt + text if config.api == "completions" else text
    return {"text_tail": text[-TEXT_TAIL_CHARS:], "finish_reason": choice.finish_reason,
            "completion_tokens": response.usage.completion_tokens if response.usage else None,
            "extracted": extract_answer(answered)}


def evaluate(config: AccuracyConfig) -> dict:
    from openai import APIConnectionError, AuthenticationError, OpenAI
    from tqdm import tqdm

    problems = load_problems(config.data, config.split, config.problem_field, config.answer_field)
    client = OpenAI(base_url=config.base_url.rstrip("/") + "/v1", api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
                    timeout=config.request_timeout, max_retries=1)
    try:
        client.models.list()
    except APIConnectionError:
        raise ValueError(f"no server answers at {config.base_url}; "
                         "start one (python -m easyep_sglang.launch ...)") from None
    except AuthenticationError:
        raise ValueError(f"the server at {config.base_url} refused the API key; set OPENAI_API_KEY to its --api-key") from None
    # the server as it was when sampling started; refused unless it serves --mask
    facts = provenance(config.base_url, mask_path=config.mask, api_key=os.environ.get("OPENAI_API_KEY"))
    started = time.monotonic()
    samples: list[list[dict | None]] = [[None] * config.n for _ in problems]
    with ThreadPoolExecutor(max_workers=config.concurrency) as pool:
        futures = {}
        for i, problem in enumerate(problems):
            for j in range(config.n):
                seed = None if config.seed is None else config.seed + i * config.n + j
                futures[pool.submit(sample, client, config, problem, seed)] = (i, j)
        for future in tqdm(as_completed(futures), total=len(futures), desc="samples", disable=config.quiet):
            i, j = futures[future]
            result = future.result()
            # Graded here, in the main thread: math-verify's timeouts use signals.
            result["correct"] = is_correct(result.get("extracted"), problems[i].answer)
            samples[i][j] = result
    per_problem = [
        {"index": i, "answer": p.answer, "pass@1": sum(s["correct"] for s in samples[i]) / config.n,
         "samples": samples[i]}
        for i, p in enumerate(problems)
    ]
    return {
        "kind": "accuracy", "data": str(config.data), "data_sha256": data_digest(config.data),
        "data_split": config.split,
        "data_fields": {"problem": config.problem_field, "answer": config.answer_field},
        "served_model": config.model, "n": config.n, "temperature": config.temperature, "top_p": config.top_p,
        "max_tokens": config.max_tokens, "concurrency": config.concurrency, "seed": config.seed,
        "prompt_suffix": config.prompt_suffix, "api": config.api, "stop": config.stop,
        "num_problems": len(problems),
        "pass@1": sum(p["pass@1"] for p in per_problem) / len(per_problem),
        "errors": sum("error" in s for row in samples for s in row),
        "duration_s": round(time.monotonic() - started, 1),
        **facts, "problems": per_problem,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m easyep_sglang.accuracy", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--base-url", required=True, help="server address, e.g. http://127.0.0.1:30000")
    parser.add_argument("--model", required=True, help="served model name (GET /v1/models lists it)")
    parser.add_argument("--data", default=AccuracyConfig.data, metavar="PATH",
                        help=f"problems with answers: {SUPPORTED} (default: the bundled tiny_math.jsonl)")
    parser.add_argument("--split", help="the split to read, where the data has several (e.g. a saved DatasetDict)")
    parser.add_argument("--problem-field", metavar="FIELD",
                        help=f"the problem's field (default: the first of {', '.join(PROBLEM_FIELDS)} the data has)")
    parser.add_argument("--answer-field", metavar="FIELD", help="the gold answer's field; a value holding \\boxed{} "
                        f"answers with its last one (default: the first of {', '.join(ANSWER_FIELDS)} the data has)")
    parser.add_argument("--out", required=True, help="JSONL report; one row per run is appended")
    parser.add_argument("--n", type=int, default=AccuracyConfig.n, help="samples per problem (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=AccuracyConfig.temperature, help="(default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=AccuracyConfig.top_p, help="(default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=AccuracyConfig.max_tokens, help="per sample (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=AccuracyConfig.concurrency, help="requests in flight (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="base sampling seed; sample j of problem i uses seed + i*n + j")
    parser.add_argument("--prompt-suffix", default=AccuracyConfig.prompt_suffix, help="appended to every problem "
                        "(default: DeepSeek-R1's 'reason step by step ... within \\boxed{}')")
    parser.add_argument("--api", choices=("chat", "completions"), default=AccuracyConfig.api,
                        help="chat: the problem as a user message; completions: as raw text the model continues, "
                        "for base models such as the demo's 'Q: 37+48=? A:' (default: chat)")
    parser.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable), e.g. a newline")
    parser.add_argument("--mask", help="the mask file the server was started with; it must be the mask the server "
                        "reports serving (GET /server_info), else nothing is sampled. Without it the server must serve "
                        "no mask. The report records both digests")
    parser.add_argument("--request-timeout", type=float, default=AccuracyConfig.request_timeout, help="seconds per request (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> None:
    config = AccuracyConfig(**vars(build_parser().parse_args(argv)))
    if config.n < 1 or config.concurrency < 1:
        raise SystemExit("easyep: error: --n and --concurrency must be at least 1")
    try:
        row = evaluate(config)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"easyep: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    append_row(config.out, row)
    print(f"pass@1 {row['pass@1']:.4f} over {row['num_problems']} problems x {config.n} samples "
          f"({row['errors']} request errors, {row['duration_s']}s); row appended to {config.out}")
