"""python -m easyep_sglang.calibrate: EASY-EP calibration statistics of one domain, computed inside SGLang.

1. The model answers every prompt through SGLang (by default T=0.6, top-p 0.95, as in the paper),
   unless --use-responses takes the answers from the file.
2. The --num-samples longest prompt+answer samples are kept, as the reference code does.
3. With the recorder on, each sample is prefilled once with max_new_tokens=1: the one sampled token
   comes from the prefill's logits, so no decode step runs. The prefix cache is flushed before every
   prefill, so each token is computed, and counted, exactly once, whether or not the server runs with
   --disable-radix-cache; the server's cached_tokens and the recorded token count are checked.
4. The worker's ExpertStats dump is saved to --out with its provenance.

Without --base-url a server is started through our launcher with --record-stats (arguments this
command does not know go to SGLang). With --base-url, the server must have been started by
`python -m easyep_sglang.launch --record-stats DIR`, and --stats-dir must name that DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from easyep_sglang.server_process import LaunchedServer
from easyep_sglang.sglang_plugin.stats_recorder import DUMP_GLOB
from easyep_sglang.spec import spec_from_model_path
from easyep_sglang.stats import ExpertStats

GENERATE_BATCH = 8  # prompts per /generate call while answering


@dataclass(frozen=True)
class Sample:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...] = ()

    @property
    def token_ids(self) -> list[int]:
        return [*self.prompt_ids, *self.response_ids]


class ServerClient:
    """The calls calibration makes, over SGLang's native HTTP API (engine.EngineClient: the same over sglang.Engine)."""

    def __init__(self, base_url: str, timeout: float = 3600):
        self.base_url, self.timeout = base_url.rstrip("/"), timeout

    def _post(self, path: str, body: object = None) -> bytes:
        data = b"" if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as resp:
            return resp.read()

    def generate(self, input_ids: list[list[int]], sampling_params: list[dict]) -> list[dict]:
        return json.loads(self._post("/generate", {"input_ids": input_ids, "sampling_params": sampling_params}))

    def flush_cache(self) -> bool:
        """False while requests are running: SGLang then answers 400 and flushes nothing."""
        try:
            self._post("/flush_cache")
        except urllib.error.HTTPError as err:
            if err.code == 400:
                return False
            raise
        return True

    def expert_record(self, action: str) -> None:
        """action: start (resets the statistics), stop or dump."""
        self._post(f"/{action}_expert_distribution_record")


def read_prompts(path: str | Path) -> list[dict]:
    """.jsonl: one object per line with `text`/`prompt` or `messages`, optionally `response`; else one prompt per line."""
    path = Path(path)
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if path.suffix != ".jsonl":
        return [{"text": line} for _, line in lines]
    records = []
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n} is not JSON ({err})") from None
        if not isinstance(record, dict) or not ({"text", "prompt", "messages"} & record.keys()):
            raise ValueError(f"{path}:{n} needs a 'text', 'prompt' or 'messages' field")
        records.append(record)
    return records


def tokenize(records: list[dict], tokenizer, use_responses: bool) -> list[Sample]:
    """Prompt ids as SGLang makes them (BOS included; chat messages through the chat template)."""
    samples = []
    for n, record in enumerate(records, 1):
        if "messages" in record:
            prompt = tokenizer.apply_chat_template(record["messages"], tokenize=True, add_generation_prompt=True,
                                                   return_dict=False)
        else:
            prompt = tokenizer(record.get("text", record.get("prompt")))["input_ids"]
        if use_responses and not isinstance(record.get("response"), str):
            raise ValueError(f"prompt {n} has no 'response' string; drop --use-responses to let the model answer")
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] if use_responses else ()
        samples.append(Sample(tuple(prompt), tuple(response)))
    return samples


def answer(client, samples: list[Sample], max_new_tokens: int, temperature: float, top_p: float, seed: int) -> list[Sample]:
    """The model's own response to each prompt. `sampling_seed` = seed + index (SGLang honours it only
    under --enable-deterministic-inference)."""
    out = []
    with tqdm(total=len(samples), desc="answer", unit="prompt") as bar:
        for start in range(0, len(samples), GENERATE_BATCH):
            batch = samples[start : start + GENERATE_BATCH]
            params = [{"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                       "sampling_seed": seed + start + i} for i in range(len(batch))]
            results = client.generate([list(s.prompt_ids) for s in batch], params)
            out += [Sample(s.prompt_ids, tuple(r["output_ids"])) for s, r in zip(batch, results)]
            bar.update(len(batch))
    return out


def longest(samples: list[Sample], n: int) -> list[Sample]:
    """The n longest samples (ties: input order), in input order."""
    keep = sorted(sorted(range(len(samples)), key=lambda i: -len(samples[i].token_ids))[:n])
    return [samples[i] for i in keep]


def collect(client, stats_dir: str | Path, samples: list[Sample], progress: bool = True) -> tuple[ExpertStats, dict]:
    """Prefill every sample once with the recorder on; return the worker's statistics and provenance.

    Each token is counted exactly once, or this raises: the flush before every prefill leaves nothing for
    the prefix cache to serve (checked: cached_tokens == 0), max_new_tokens=1 runs no decode step, and the
    recorded token count must equal the samples' token count.
    """
    stats_dir = Path(stats_dir)
    stats_dir.mkdir(parents=True, exist_ok=True)
    client.expert_record("start")  # resets the sums
    try:
        for n, sample in enumerate(tqdm(samples, desc="prefill", unit="sample", disable=not progress)):
            flush_prefix_cache(client)
            meta = client.generate([sample.token_ids], [{"max_new_tokens": 1, "temperature": 0.0}])[0]["meta_info"]
            if meta["cached_tokens"] or meta["prompt_tokens"] != len(sample.token_ids):
                raise RuntimeError(f"sample {n}: {meta['cached_tokens']} of {meta['prompt_tokens']} tokens came from the "
                                   "prefix cache; calibrate on a server no other client is using")
    finally:
        client.expert_record("stop")
    before = set(stats_dir.glob(DUMP_GLOB))
    client.expert_record("dump")
    written = set(stats_dir.glob(DUMP_GLOB)) - before
    if len(written) != 1:
        raise RuntimeError(f"the server wrote no statistics to {stats_dir}; start it with "
                           f"python -m easyep_sglang.launch --record-stats {stats_dir}")
    stats, provenance = ExpertStats.load(written.pop())
    expected = sum(len(s.token_ids) for s in samples)
    if (stats.tokens != expected).any():
        raise RuntimeError(f"recorded {stats.tokens.tolist()} tokens per MoE layer, expected {expected}; "
                           "another client used the server while recording: calibrate on a server of your own")
    return stats, provenance


def flush_prefix_cache(client, timeout: float = 60) -> None:
    """Empty the prefix cache, so the next prefill computes every token; waits while requests run."""
    deadline = time.monotonic() + timeout
    while not client.flush_cache():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server kept requests running for {timeout:.0f}s, so its prefix cache could not be "
                               "flushed; calibrate on a server no other client is using")
        time.sleep(0.1)


@contextmanager
def connect(args: argparse.Namespace, sglang_args: list[str]):
    """(client, stats_dir) of the server given by --base-url, or of one started here."""
    if args.base_url:
        if sglang_args or not args.stats_dir:
            raise ValueError("--base-url needs --stats-dir DIR (the server's --record-stats DIR) and takes no SGLang "
                             f"arguments (got {sglang_args})")
        yield ServerClient(args.base_url), Path(args.stats_dir)
        return
    with tempfile.TemporaryDirectory(prefix="easyep-calibrate-") as tmp:
        log = server_log_path()
        server = LaunchedServer(args.model_path, extra_args=["--record-stats", tmp, *sglang_args], log_path=log)
        server.start()  # a failure names the log and quotes its last lines
        try:
            yield ServerClient(server.base_url), Path(tmp)
        finally:
            server.stop()
        log.unlink()


def server_log_path() -> Path:
    """The log of the server calibrate starts: outside its statistics folder, so the log a failure points to
    outlives it; removed after a clean run."""
    return Path(tempfile.gettempdir()) / f"easyep-calibrate-server-{os.getpid()}.log"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m easyep_sglang.calibrate",
        description="EASY-EP calibration statistics of one domain, computed inside SGLang.",
        epilog="example: python -m easyep_sglang.calibrate --model-path M --prompts math.jsonl --domain math "
        "--out stats/math.safetensors\n\n" + __doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, metavar="DIR", help="local Hugging Face model directory")
    parser.add_argument("--prompts", required=True, metavar="FILE",
                        help="JSONL with 'text'/'prompt' or chat 'messages' (and 'response'), or text, one prompt per line")
    parser.add_argument("--domain", required=True, help="domain name recorded in the provenance, e.g. math")
    parser.add_argument("--out", required=True, metavar="FILE", help="statistics file to write (.safetensors)")
    parser.add_argument("--num-samples", type=int, default=25, metavar="N", help="keep the N longest samples (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="answer length cap (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.6, metavar="T", help="answer sampling (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=0.95, metavar="P", help="answer sampling (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed of the first prompt (default: %(default)s)")
    parser.add_argument("--use-responses", action="store_true", help="take the answers from the 'response' fields")
    parser.add_argument("--base-url", metavar="URL", help="a running server started with python -m easyep_sglang.launch --record-stats DIR")
    parser.add_argument("--stats-dir", metavar="DIR", help="with --base-url: the server's --record-stats DIR")
    return parser


def run(args: argparse.Namespace, sglang_args: list[str]) -> tuple[ExpertStats, dict]:
    from transformers import AutoTokenizer

    if args.num_samples < 1:
        raise ValueError(f"--num-samples {args.num_samples} must be at least 1")
    spec = spec_from_model_path(args.model_path)
    records = read_prompts(args.prompts)
    samples = tokenize(records, AutoTokenizer.from_pretrained(args.model_path), args.use_responses)
    with connect(args, sglang_args) as (client, stats_dir):
        if not args.use_responses:
            samples = answer(client, samples, args.max_new_tokens, args.temperature, args.top_p, args.seed)
        samples = longest(samples, args.num_samples)
        stats, recorded = collect(client, stats_dir, samples)
    if recorded["model"]["fingerprint"] != spec.fingerprint:
        raise ValueError(f"the server serves another model ({recorded['model']}) than {args.model_path}; "
                         "pass the server's --model-path")
    settings = {key: getattr(args, key) for key in ("num_samples", "max_new_tokens", "temperature", "top_p", "seed",
                                                    "use_responses")}
    provenance = {**recorded, "model_path": str(args.model_path), "domain": args.domain, "samples": len(samples),
                  "prompts": {"path": str(args.prompts), "count": len(records)}, "settings": settings}
    stats.save(args.out, provenance)
    return stats, provenance


def main(argv: list[str] | None = None) -> None:
    args, sglang_args = build_parser().parse_known_args(argv)
    try:
        stats, provenance = run(args, sglang_args)
    except (ValueError, RuntimeError, OSError) as err:
        sys.exit(f"easyep calibrate: error: {err}")
    print(f"easyep: wrote {args.out}: {args.domain}, {provenance['samples']} samples, {int(stats.tokens.max())} tokens, "
          f"{len(stats.layer_ids)} MoE layers")


if __name__ == "__main__":
    main()
