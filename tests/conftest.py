"""Shared fixtures: tiny models built once per session, and a pool of real SGLang servers.

Servers are expensive (20-40 s to start, ~3 GB each), so the pool starts one on first use, shares
it across tests and modules, keeps at most MAX_ALIVE alive (stopping the least recently used),
and stops every server it started at the end of the session, by PID. Idle servers cost no CPU (the
launcher's CPU defaults include --sleep-on-idle), so tests that start servers of their own leave
the pool's alive.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from collections import OrderedDict
from pathlib import Path

import pytest

from easyep_sglang.demo_model import build_tiny_model
from easyep_sglang.server_process import LaunchedServer
from easyep_sglang.sglang_plugin.expert_distribution import RECORDER_DIR_ENV, RECORDER_SERVER_ARGS

MAX_ALIVE = int(os.environ.get("EASYEP_TEST_MAX_SERVERS", "3"))  # fewer on a machine short of memory
ARCHS = ("deepseek_v3", "qwen3_moe")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_models_fp32(tmp_path_factory) -> dict[str, Path]:
    """The same tiny models in float32 (serve them with --dtype float32), where SGLang and transformers agree closely."""
    root = tmp_path_factory.mktemp("models-fp32")
    return {arch: build_tiny_model(arch, root / arch, dtype="float32") for arch in ARCHS}


class ServerPool:
    def __init__(self, root: Path):
        self.root = root
        self.alive: OrderedDict[tuple, LaunchedServer] = OrderedDict()

    def get(self, model: Path, mask: Path | None = None, extra_args: tuple[str, ...] = ()) -> LaunchedServer:
        key = (str(model), str(mask), tuple(extra_args))
        if key in self.alive:
            self.alive.move_to_end(key)
            return self.alive[key]
        while len(self.alive) >= MAX_ALIVE:
            _, oldest = self.alive.popitem(last=False)
            oldest.stop()
        name = f"server{len(list(self.root.glob('server*')))}"
        workdir = self.root / name
        workdir.mkdir()
        server = LaunchedServer(
            model, mask=mask, extra_args=[*RECORDER_SERVER_ARGS, *extra_args],
            env={RECORDER_DIR_ENV: str(workdir)}, log_path=workdir / "server.log",
        )
        server.recorder_dir = workdir
        server.start()
        self.alive[key] = server
        return server

    def stop_all(self) -> None:
        while self.alive:
            self.alive.popitem()[1].stop()


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    pool = ServerPool(tmp_path_factory.mktemp("servers"))
    yield pool
    pool.stop_all()


def generate(server: LaunchedServer, prompt: str, max_new_tokens: int = 24, temperature: float = 0.0) -> dict:
    """SGLang's native /generate with output logprobs; returns {"text", "token_ids", "logprobs"}."""
    body = {
        "text": prompt,
        "sampling_params": {"temperature": temperature, "max_new_tokens": max_new_tokens, "ignore_eos": True},
        "return_logprob": True,
    }
    request = urllib.request.Request(server.base_url + "/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as resp:
        out = json.loads(resp.read())
    logprobs = out["meta_info"]["output_token_logprobs"]  # [(logprob, token_id, text)]
    return {"text": out["text"], "token_ids": [t[1] for t in logprobs], "logprobs": [t[0] for t in logprobs]}


# Recording servers of the fp32 models: DeepSeek with small prefill chunks and the prefix cache on,
# Qwen with the default chunks and the cache off, so calibration is checked under both.
RECORDING_ARGS = {
    "deepseek_v3": ("--dtype", "float32", "--chunked-prefill-size", "16"),
    "qwen3_moe": ("--dtype", "float32", "--disable-radix-cache"),
}


def recording_server(servers: ServerPool, model: Path, *extra_args: str) -> LaunchedServer:
    """A pool server started with --record-stats; its statistics directory is `server.stats_dir`."""
    key = hashlib.sha256(repr((str(model), extra_args)).encode()).hexdigest()[:12]
    stats_dir = servers.root / f"stats-{key}"
    server = servers.get(model, None, ("--record-stats", str(stats_dir), *extra_args))
    server.stats_dir = stats_dir
    return server
