"""Shared fixtures: tiny models built once per session, and the session's planned SGLang servers.

Tests name the servers they use with `@pytest.mark.servers(...)` (see server_pool.py); the pool starts
them ahead of their first use and stops them after their last, every one by PID, and prints a line
about their start-up times at the end of the session. The other tests run while servers start
(run_order.py).
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from bench.micro.server_startup import other_model_modules
from easyep_sglang.serving.calibrate import ServerClient, flush_prefix_cache
from run_order import grouped, interleaved
from server_pool import ModelStore, ServerPool

ARCHS = ("deepseek_v3", "qwen3_moe")
POOL = pytest.StashKey[ServerPool]()
PLANNED = pytest.StashKey[dict[str, int]]()  # node id -> its place among the tests that use planned servers
# A scheduler imports all ~250 SGLang model modules, and what they import, to fill its model registry; SGLang's own
# SGLANG_DISABLED_MODEL_ARCHS skips the unrelated ones in every server the tests start (python -m bench.micro.server_startup).
os.environ.setdefault("SGLANG_DISABLED_MODEL_ARCHS", other_model_modules())


def pytest_configure(config):
    config.addinivalue_line("markers", "servers(*names): the planned test servers a test uses (tests/server_pool.py)")


def pytest_collection_modifyitems(session, config, items):
    """The planned tests in the order of run_order.grouped, after the others; pytest_runtestloop interleaves them."""
    items[:] = [item for item in items if not server_names(item)] + grouped(
        [item for item in items if server_names(item)], server_names)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """pytest's own loop (_pytest/main.py), in the order of run_order.interleaved: the tests that use no planned
    server run while the pool starts the next servers, instead of the tests waiting for them."""
    if session.testsfailed and not session.config.option.continue_on_collection_errors:
        raise session.Interrupted(f"{session.testsfailed} error(s) during collection")
    if session.config.option.collectonly:
        return True

    def ready(names: list[str]) -> bool:
        return POOL in session.config.stash and session.config.stash[POOL].serving(names)

    module_of = lambda item: item.getparent(pytest.Module)  # noqa: E731
    for item, following in interleaved(session.items, server_names, module_of, ready):
        item.config.hook.pytest_runtest_protocol(item=item, nextitem=following)
        if session.shouldfail:
            raise session.Failed(session.shouldfail)
        if session.shouldstop:
            raise session.Interrupted(session.shouldstop)
    return True


def server_names(item) -> list[str]:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return [name.format(**params) for marker in item.iter_markers("servers") for name in marker.args]


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def servers(request, model_store, tmp_path_factory):
    planned = [item for item in request.session.items if server_names(item)]  # as selected (-k) and ordered
    request.config.stash[PLANNED] = {item.nodeid: index for index, item in enumerate(planned)}
    pool = ServerPool(model_store, tmp_path_factory.mktemp("servers"), [server_names(item) for item in planned])
    request.config.stash[POOL] = pool
    yield pool
    pool.close()


@pytest.fixture(autouse=True)
def _server_pool_position(request, servers):
    """Tells the pool which planned test runs, so it starts the next servers ahead and stops those no later test
    uses. The tests that use no planned server do not move it."""
    index = request.config.stash[PLANNED].get(request.node.nodeid)
    if index is None:
        yield
        return
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
