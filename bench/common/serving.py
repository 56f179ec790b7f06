"""Drive SGLang's own load generator against a running server, offline; measure the server's memory and CPU.

    python -m bench.common.serving --base-url http://127.0.0.1:30000 --model DIR [--input-len 64 --output-len 32 ...]

The load generator is `python -m sglang.benchmark.serving` (the module behind bench_serving) with the
`random-ids` dataset, which draws token ids from the local tokenizer, so nothing is downloaded. Lengths
are exact (`--random-range-ratio 1`) and EOS is ignored, so every request produces output_len tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# The fields of SGLang's result dict a report row keeps (all others stay in the raw result).
RESULT_FIELDS = (
    "duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "input_throughput", "output_throughput", "total_throughput", "mean_ttft_ms", "median_ttft_ms",
    "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_e2e_latency_ms",
)


@dataclass(frozen=True)
class BenchConfig:
    input_len: int = 64
    output_len: int = 32
    num_prompts: int = 32
    concurrency: int = 8
    seed: int = 42
    timeout_s: float = 1800  # the whole bench_serving run; a hung server fails instead of blocking a sweep


def bench_command(base_url: str, model_path: str | Path, config: BenchConfig, output_file: Path) -> list[str]:
    return [
        sys.executable, "-m", "sglang.benchmark.serving",
        "--backend", "sglang", "--base-url", base_url,
        "--dataset-name", "random-ids", "--model", str(model_path), "--tokenizer", str(model_path),
        "--random-input-len", str(config.input_len), "--random-output-len", str(config.output_len),
        "--random-range-ratio", "1", "--num-prompts", str(config.num_prompts),
        "--max-concurrency", str(config.concurrency), "--seed", str(config.seed),
        "--output-file", str(output_file), "--disable-tqdm",
    ]


def run_bench_serving(base_url: str, model_path: str | Path, config: BenchConfig = BenchConfig()) -> dict:
    """Run one bench_serving pass; return SGLang's result dict (output_throughput, mean_ttft_ms, ...)."""
    with tempfile.TemporaryDirectory(prefix="easyep-bench-") as tmp:
        output_file = Path(tmp) / "result.jsonl"
        command = bench_command(base_url, model_path, config, output_file)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=config.timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"bench_serving did not finish in {config.timeout_s:.0f}s; use fewer prompts "
                               "or shorter lengths, or raise BenchConfig.timeout_s") from None
        lines = output_file.read_text().splitlines() if output_file.exists() else []
        if proc.returncode != 0 or not lines:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
            raise RuntimeError(f"bench_serving failed (exit {proc.returncode}) against {base_url}:\n{tail}")
    result = json.loads(lines[-1])
    if result["completed"] != config.num_prompts:
        raise RuntimeError(f"only {result['completed']}/{config.num_prompts} requests completed against {base_url}; "
                           "see the server log")
    return result


def summarize(result: dict) -> dict:
    return {key: result.get(key) for key in RESULT_FIELDS}


def bench_server(server, model_path: str | Path, config: BenchConfig = BenchConfig()) -> dict:
    """One bench_serving run against a LaunchedServer: SGLang's key results, the server's PSS and CPU time.

    Output tokens per server CPU-second (CPU time includes bench_serving's one warm-up request) moves
    less than tokens per wall-clock second when other work shares the host, provided the server runs one
    OpenMP thread: with more, threads spinning at barriers for a preempted peer inflate it."""
    before = cpu_seconds(server.pids())
    result = summarize(run_bench_serving(server.base_url, model_path, config))
    if not server.pids():  # on another machine
        return {**result, "server_cpu_s": None, "output_tokens_per_cpu_s": None, "server_pss_bytes": None}
    used = cpu_seconds(server.pids()) - before
    return {**result, "server_cpu_s": used, "output_tokens_per_cpu_s": result["total_output_tokens"] / used,
            "server_pss_bytes": server_pss_bytes(server.pids())}


def bench_replicas(servers: list, model_path: str | Path, config: BenchConfig = BenchConfig()) -> dict:
    """bench_server over replicas of one model at once, the prompts and the concurrency split evenly (a client
    that deals requests round-robin). Counts, throughputs, CPU time and PSS add up over the replicas, over the
    longest run's duration; mean latencies are the replicas' means (each served the same number of requests)."""
    if len(servers) == 1:
        return bench_server(servers[0], model_path, config)
    n = len(servers)
    if config.concurrency % n or config.num_prompts % n:
        raise ValueError(f"split {config.concurrency} concurrent of {config.num_prompts} requests evenly over {n} "
                         "replicas: give a concurrency and a number of prompts divisible by the replicas")
    part = replace(config, num_prompts=config.num_prompts // n, concurrency=config.concurrency // n)
    with ThreadPoolExecutor(n) as pool:
        parts = list(pool.map(lambda server: bench_server(server, model_path, part), servers))
    merged = dict.fromkeys(RESULT_FIELDS)  # medians and percentiles do not combine: they stay None
    merged.update({key: None if None in (values := [r[key] for r in parts]) else sum(values)
                   for key in ("completed", "total_input_tokens", "total_output_tokens", "server_cpu_s",
                               "server_pss_bytes")})
    duration = max(r["duration"] for r in parts)
    merged.update({f"{kind}_throughput": merged[f"total_{kind}_tokens"] / duration for kind in ("input", "output")})
    merged.update(duration=duration, request_throughput=merged["completed"] / duration,
                  total_throughput=(merged["total_input_tokens"] + merged["total_output_tokens"]) / duration,
                  output_tokens_per_cpu_s=merged["server_cpu_s"] and merged["total_output_tokens"] / merged["server_cpu_s"],
                  **{key: statistics.mean(r[key] for r in parts) for key in ("mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms")},
                  replicas=parts)
    return merged


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes (all their threads) have used so far; exited ones count 0."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process: shared pages are split among the processes sharing them."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024  # the file reports kB
    raise RuntimeError(f"/proc/{pid}/smaps_rollup has no Pss line; a Linux kernel >= 4.14 is needed")


def server_pss_bytes(pids: list[int]) -> int:
    """Sum of PSS over a server's processes (e.g. LaunchedServer.pids()); processes that exit meanwhile count 0."""
    total = 0
    for pid in pids:
        try:
            total += pss_bytes(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


class RunningServer:
    """A server started elsewhere on this machine, found by its URL: its processes are the one listening on the
    URL's port (SGLang's server process) and its descendants (schedulers, detokenizer)."""

    def __init__(self, base_url: str):
        import psutil

        address = urllib.parse.urlsplit(base_url)
        if address.hostname not in LOOPBACK_HOSTS or address.port is None:
            raise ValueError(f"{base_url}: give a loopback URL with its port (http://127.0.0.1:PORT); the server's "
                             "memory and CPU are read from this machine's /proc")
        listeners = {c.pid for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == address.port and c.pid}
        if not listeners:
            raise ValueError(f"no process of this user listens on port {address.port} ({base_url}); start the server, "
                             "or run this as the user who started it")
        self.base_url, self.process = base_url.rstrip("/"), psutil.Process(min(listeners))

    def pids(self) -> list[int]:
        return [self.process.pid, *(child.pid for child in self.process.children(recursive=True))]


class RemoteServer:
    """A server on another machine: measured through its URL only."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")

    def pids(self) -> list[int]:
        return []


def served_at(base_url: str) -> RunningServer | RemoteServer:
    """The server at a URL: on this machine (its memory and CPU are read) if the URL is a loopback one."""
    host = urllib.parse.urlsplit(base_url).hostname
    return RunningServer(base_url) if host in LOOPBACK_HOSTS else RemoteServer(base_url)


def omp_env(threads: int | None) -> dict[str, str]:
    """Server environment pinning torch's CPU intra-op threads (OMP_NUM_THREADS); {} keeps torch's default."""
    return {"OMP_NUM_THREADS": str(threads)} if threads else {}


@contextmanager
def sigterm_unwinds():
    """Inside, SIGTERM raises SystemExit, so `with LaunchedServer(...)` blocks unwind and stop their servers."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(
        prog="python -m bench.common.serving",
        description="Run SGLang's bench_serving (random-ids, exact lengths, offline) against a running server "
        "and print the key results as JSON.",
    )
    parser.add_argument("--base-url", required=True, help="server address, e.g. http://127.0.0.1:30000")
    parser.add_argument("--model", required=True, help="local model directory (tokenizer for random-ids)")
    parser.add_argument("--input-len", type=int, default=defaults.input_len, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=defaults.output_len, help="generated tokens per request")
    parser.add_argument("--num-prompts", type=int, default=defaults.num_prompts, help="requests in the run")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="requests in flight at most")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the random prompts")
    args = parser.parse_args(argv)
    config = BenchConfig(args.input_len, args.output_len, args.num_prompts, args.concurrency, args.seed)
    try:
        result = run_bench_serving(args.base_url, args.model, config)
    except RuntimeError as err:
        print(f"easyep: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps({"config": asdict(config), **summarize(result)}, indent=2))


if __name__ == "__main__":
    main()
