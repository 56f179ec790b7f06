"""Shared fixtures: tiny models built once per session, and the session's planned SGLang servers.

Tests name the servers they use with `@pytest.mark.servers(...)` (see server_pool.py); the pool starts
them ahead of their first use and stops them after their last, every one by PID, and prints a line
about their start-up times at the end of the session.
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from bench.server_startup import other_model_modules
from easyep_sglang.calibrate import ServerClient, flush_prefix_cache
from server_pool import ModelStore, ServerPool

ARCHS = ("deepseek_v3", "qwen3_moe")
POOL = pytest.StashKey[ServerPool]()
# A scheduler imports all ~250 SGLang model modules, and what they import, to fill its model registry; SGLang's own
# SGLANG_DISABLED_MODEL_ARCHS skips the unrelated ones in every server the tests start (python -m bench.server_startup).
os.environ.setdefault("SGLANG_DISABLED_MODEL_ARCHS", other_model_modules())


def pytest_configure(config):
    config.addinivalue_line("markers", "servers(*names): the planned test servers a test uses (tests/server_pool.py)")


def pytest_collection_modifyitems(session, config, items):
    """Tests that use no planned server run first (in their usual order), while the pool starts the first
    planned servers in the background; otherwise the first server tests would wait for them on an idle core."""
    items.sort(key=lambda item: bool(server_names(item)))


def server_names(item) -> list[str]:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return [name.format(**params) for marker in item.iter_markers("servers") for name in marker.args]


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def servers(request, model_store, tmp_path_factory):
    pool = ServerPool(model_store, tmp_path_factory.mktemp("servers"), [server_names(i) for i in request.session.items])
    request.config.stash[POOL] = pool
    yield pool
    pool.close()


@pytest.fixture(autouse=True)
def _server_pool_position(request, servers):
    """Tells the pool which test runs, so it starts the next servers ahead and stops those no later test uses."""
    index = request.session.items.index(request.node)
    servers.enter(index)
    yield
    servers.leave(index)


def pytest_terminal_summary(terminalreporter, config):
    if POOL in config.stash:
        terminalreporter.write_line(config.stash[POOL].summary())


@pytest.fixture(scope="session")
def tiny_models(model_store) -> dict:
    return {arch: model_store.model(f"{arch}/bf16") for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_models_fp32(model_store) -> dict:
    """The same tiny models in float32 (serve them with --dtype float32), where SGLang and transformers agree closely."""
    return {arch: model_store.model(f"{arch}/fp32") for arch in ARCHS}


def generate(server, prompt: str, max_new_tokens: int = 24, temperature: float = 0.0) -> dict:
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


def greedy(server, prompts: list[str]) -> list[dict]:
    """generate() of each prompt from an empty prefix cache, so that tokens and logprobs do not depend on what
    the (shared) server served before: a cached prefix changes the prefill's chunks, and fp32 rounding."""
    outputs = []
    for prompt in prompts:
        flush_prefix_cache(ServerClient(server.base_url))
        outputs.append(generate(server, prompt))
    return outputs
