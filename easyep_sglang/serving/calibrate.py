"""python -m easyep_sglang.calibrate: EASY-EP calibration statistics of one domain, computed inside SGLang.

1. The model answers every prompt through SGLang (by default T=0.6, top-p 0.95, as in the paper),
   unless --use-responses takes the answers from the file.
2. The --num-samples longest prompt+answer samples are kept, as the reference code does.
3. With the recorder on, each sample is prefilled once with max_new_tokens=1: the one sampled token
   comes from the prefill's logits, so no decode step runs. The prefix cache is flushed before every
   prefill, so each token is computed, and counted, exactly once, whether or not the server runs with
   --disable-radix-cache; the server's cached_tokens and the recorded token count are checked.
4. The worker's ExpertStats dump is saved to --out with its provenance.

--prompts is read with Hugging Face datasets (JSONL, JSON, Parquet, Arrow, CSV, text, or a folder written by
save_to_disk; --split picks a split); easyep_sglang/serving/calibration_data.py says which fields hold the prompt,
chat messages and response. Data that cannot be used (no such field, no rows, no such split, a sample longer
than the model's context) is refused before a server starts; a response longer than the server's limit is
refused, or cut to fit with --truncate-responses.

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

from easyep_sglang.serving.calibration_data import (PROMPT_FIELDS, RESPONSE_FIELDS, Fields, Sample, fit_to_context,
                                                    model_context_bound, read_prompts, tokenize)
from easyep_sglang.core.datasets_io import SUPPORTED, data_digest
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.core.stats import ExpertStats
from easyep_sglang.serving.server_process import LaunchedServer
from easyep_sglang.sglang_plugin.stats_recorder import DUMP_GLOB

GENERATE_BATCH = 8  # prompts per /generate call while answering


@dataclass(frozen=True)
class CalibrationConfig:
    """One calibration run: the API of this stage; every flag of build_parser() maps onto the field of its name."""
    model_path: str | Path
    prompts: str | Path
    domain: str
    out: str | Path
    split: str | None = None
    prompt_field: str | None = None
    messages_field: str | None = None
    response_field: str | None = None
    num_samples: int = 25
    max_new_tokens: int = 512
    temperature: float = 0.6  # the paper's answer sampling
    top_p: float = 0.95
    seed: int = 0
    use_responses: bool = False
    truncate_responses: bool = False
    base_url: str | None = None
    stats_dir: str | Path | None = None


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

    def max_input_tokens(self) -> int | None:
        """The most tokens one request may hold: SGLang refuses `max_req_input_len` or more (None if not reported)."""
        with urllib.request.urlopen(self.base_url + "/server_info", timeout=self.timeout) as resp:
            limit = json.load(resp).get("max_req_input_len")
        return limit - 1 if isinstance(limit, int) else None


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
def connect(config: CalibrationConfig, sglang_args: list[str]):
    """(client, stats_dir) of the server given by --base-url, or of one started here."""
    if config.base_url:
        if sglang_args or not config.stats_dir:
            raise ValueError("--base-url needs --stats-dir DIR (the server's --record-stats DIR) and takes no SGLang "
                             f"arguments (got {sglang_args})")
        yield ServerClient(config.base_url), Path(config.stats_dir)
        return
    with tempfile.TemporaryDirectory(prefix="easyep-calibrate-") as tmp:
        log = server_log_path()
        server = LaunchedServer(config.model_path, extra_args=["--record-stats", tmp, *sglang_args], log_path=log)
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
    parser.add_argument("--prompts", required=True, metavar="PATH",
                        help=f"the prompts, read with Hugging Face datasets: {SUPPORTED} (.txt: one prompt per line)")
    parser.add_argument("--split", help="the split to read, where the data has several (e.g. a saved DatasetDict)")
    parser.add_argument("--prompt-field", metavar="FIELD", help="the prompt's field (default: the first of "
                        f"{', '.join(PROMPT_FIELDS)} the data has)")
    parser.add_argument("--messages-field", metavar="FIELD", help="chat turns [{role, content}], rendered by the "
                        "model's chat template (default: 'messages', if the data has it)")
    parser.add_argument("--response-field", metavar="FIELD", help="the response's field, read with --use-responses "
                        f"(default: the first of {', '.join(RESPONSE_FIELDS)} the data has)")
    parser.add_argument("--domain", required=True, help="domain name recorded in the provenance, e.g. math")
    parser.add_argument("--out", required=True, metavar="FILE", help="statistics file to write (.safetensors)")
    parser.add_argument("--num-samples", type=int, default=CalibrationConfig.num_samples, metavar="N",
                        help="keep the N longest samples (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=CalibrationConfig.max_new_tokens, metavar="N",
                        help="answer length cap (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=CalibrationConfig.temperature, metavar="T",
                        help="answer sampling (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=CalibrationConfig.top_p, metavar="P",
                        help="answer sampling (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=CalibrationConfig.seed, metavar="S",
                        help="sampling seed of the first prompt (default: %(default)s)")
    parser.add_argument("--use-responses", action="store_true", help="take the answers from the response field")
    parser.add_argument("--truncate-responses", action="store_true", help="cut a response that does not fit the "
                        "server's context to its first tokens that do, and log how many (default: refuse such data)")
    parser.add_argument("--base-url", metavar="URL", help="a running server started with python -m easyep_sglang.launch --record-stats DIR")
    parser.add_argument("--stats-dir", metavar="DIR", help="with --base-url: the server's --record-stats DIR")
    return parser


def run(config: CalibrationConfig, sglang_args: list[str]) -> tuple[ExpertStats, dict]:
    if config.num_samples < 1:
        raise ValueError(f"--num-samples {config.num_samples} must be at least 1")
    spec = spec_from_model_path(config.model_path)
    records, samples = load_samples(config, sglang_args)  # every data error is raised here, before a server starts
    room = 0 if config.use_responses else config.max_new_tokens  # tokens each prompt must leave for the answer
    with connect(config, sglang_args) as (client, stats_dir):
        limit = client.max_input_tokens() if hasattr(client, "max_input_tokens") else None
        if limit is not None:
            samples = fit_to_context(samples, limit, "the server's longest input", config.truncate_responses, room)
        if not config.use_responses:
            samples = answer(client, samples, config.max_new_tokens, config.temperature, config.top_p, config.seed)
        samples = longest(samples, config.num_samples)
        stats, recorded = collect(client, stats_dir, samples)
    if recorded["model"]["fingerprint"] != spec.fingerprint:
        raise ValueError(f"the server serves another model ({recorded['model']}) than {config.model_path}; "
                         "pass the server's --model-path")
    settings = {key: getattr(config, key) for key in ("num_samples", "max_new_tokens", "temperature", "top_p", "seed",
                                                      "use_responses")}
    prompts = {"path": str(config.prompts), "split": config.split, "sha256": data_digest(config.prompts),
               "count": len(records), "truncate_responses": config.truncate_responses,
               "fields": {key: getattr(config, f"{key}_field") for key in ("prompt", "messages", "response")}}
    provenance = {**recorded, "model_path": str(config.model_path), "domain": config.domain, "samples": len(samples),
                  "prompts": prompts, "settings": settings}
    stats.save(config.out, provenance)
    return stats, provenance


def load_samples(config: CalibrationConfig, sglang_args: list[str]) -> tuple[list[dict], list[Sample]]:
    """The records and their samples; refuses data that no server of this model could take."""
    from transformers import AutoTokenizer

    fields = Fields(config.prompt_field, config.messages_field, config.response_field)
    records = read_prompts(config.prompts, config.split, fields, config.use_responses)
    samples = tokenize(records, AutoTokenizer.from_pretrained(config.model_path), config.use_responses)
    bound = model_context_bound(config.model_path, sglang_args)
    if bound is not None:  # cut later, once, to the server's exact limit; refused now if no server could serve it
        checked = samples if not config.truncate_responses else [Sample(s.prompt_ids) for s in samples]
        fit_to_context(checked, bound, "the model's context", truncate=False,
                       room=0 if config.use_responses else config.max_new_tokens)
    return records, samples


def main(argv: list[str] | None = None) -> None:
    args, sglang_args = build_parser().parse_known_args(argv)
    config = CalibrationConfig(**vars(args))
    try:
        stats, provenance = run(config, sglang_args)
    except (ValueError, RuntimeError, OSError) as err:
        sys.exit(f"easyep calibrate: error: {err}")
    print(f"easyep: wrote {config.out}: {config.domain}, {provenance['samples']} samples, "
          f"{int(stats.tokens.max())} tokens, {len(stats.layer_ids)} MoE layers")
