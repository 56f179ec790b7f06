"""What a server operator expects: the server listens on 127.0.0.1 unless told otherwise, `--api-key` passes
through to SGLang and refuses requests without the key, and nothing changes the served mask at runtime: the mask
file is read only while the server starts, and SGLang's weight reload is refused.

One server of this module's own, since the pool's servers take neither --api-key nor SGLang's default host: started
through the launcher with no --host, with --api-key, and with a copy of a test mask that no other test reads.
"""

import ipaddress
import json
import shutil
import urllib.error
import urllib.request

import psutil
import pytest

from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.eval import accuracy
from easyep_sglang.eval.provenance import read_rows, server_info
from easyep_sglang.serving.server_process import free_port
from expert_distribution import record_expert_counts
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.sglang_plugin.served_mask import REPORT_KEY
from server_pool import witnessed_server
from server_specs import MASKS, MODEL_ARGS

API_KEY = "easyep-test-key-8c1f"
MASK = "deepseek_v3/varying"
PROMPTS = ["Q: 37+48=? A:", "def add(a, b):\n    return", "The license grants you"]


@pytest.fixture(scope="module")
def server(model_store, tmp_path_factory):
    work = tmp_path_factory.mktemp("security")
    mask = shutil.copy(model_store.mask(MASK), work / "served-mask.json")
    store_port = free_port()  # torch.distributed's rendezvous store, named so the test can tell it apart
    args = ("--dtype", "float32", *MODEL_ARGS["deepseek_v3"], "--api-key", API_KEY, "--nccl-port", str(store_port),
            "--mem-fraction-static", "0.2")  # the launcher's 0.05 fails when others take memory while it loads
    launched = witnessed_server(model_store.model("deepseek_v3/fp32"), mask, args, work)
    launched.store_port = store_port
    at = launched.command.index("--host")
    del launched.command[at:at + 2]  # started as an operator who names no host starts it
    with launched:
        yield launched


def call(server, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, bytes]:
    """(HTTP status, body) of a GET, or of a POST when `body` is given."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(server.base_url + path, data, headers), timeout=300) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    addresses = set()
    for pid in pids:
        try:
            sockets = psutil.Process(pid).net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        addresses |= {(s.laddr.ip, s.laddr.port) for s in sockets if s.status == psutil.CONN_LISTEN}
    return addresses


def test_listens_on_loopback_only_unless_told(server):
    """The HTTP server listens on 127.0.0.1 alone. One exception, in the scheduler and not ours to change: PyTorch's
    TCPStore, where torch.distributed's ranks meet (SGLang's --nccl-port), listens on every interface."""
    assert "--host" not in server.command
    addresses = listening_addresses(server.pids())
    assert ("127.0.0.1", server.port) in addresses
    assert server.store_port in {port for _, port in addresses}, "the scheduler's sockets were read too"
    exposed = {(ip, port) for ip, port in addresses if not ipaddress.ip_address(ip).is_loopback}
    assert {port for _, port in exposed} <= {server.store_port}, exposed


def test_api_key_is_required_on_every_endpoint_but_the_probes(server):
    completion = {"model": str(server.model_path), "prompt": "Q: 2+2=? A:", "max_tokens": 4, "temperature": 0}
    guarded = [("/v1/completions", completion), ("/v1/models", None), ("/generate", {"text": "Hi"}),
               ("/server_info", None), ("/flush_cache", {}), ("/start_expert_distribution_record", {})]
    for path, body in guarded:
        for key in (None, "wrong-key"):
            assert call(server, path, body, key)[0] == 401, (path, key)
    status, answer = call(server, "/v1/completions", completion, API_KEY)
    assert status == 200 and json.loads(answer)["usage"]["completion_tokens"] == 4
    status, info = call(server, "/server_info", key=API_KEY)
    assert status == 200 and json.loads(info)[REPORT_KEY]["mode"] == "mask"
    assert call(server, "/health")[0] == 200, "SGLang leaves its health probe open (it runs a one-token generation)"


def test_accuracy_rows_against_a_keyed_server(server, tmp_path, monkeypatch, capsys):
    data, out = tmp_path / "sums.jsonl", tmp_path / "report.jsonl"
    data.write_text('{"problem": "Q: 2+2=? A:", "answer": "4"}\n')
    argv = ["--base-url", server.base_url, "--model", str(server.model_path), "--data", str(data), "--out", str(out),
            "--n", "1", "--api", "completions", "--prompt-suffix", "", "--max-tokens", "4", "--quiet"]
    monkeypatch.setenv("OPENAI_API_KEY", "wrong-key")
    with pytest.raises(SystemExit) as exit_info:
        accuracy.main([*argv, "--mask", str(server.mask_path)])
    assert exit_info.value.code == 2 and "set OPENAI_API_KEY to its --api-key" in capsys.readouterr().err
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    accuracy.main([*argv, "--mask", str(server.mask_path)])
    [row] = read_rows(out)
    assert row["errors"] == 0 and row["served_mask_digest"] == ExpertMask.load(server.mask_path).digest()


def greedy(server, prompts: list[str]) -> list[dict]:
    """Token ids and logprobs from an empty prefix cache."""
    outputs = []
    for prompt in prompts:
        assert call(server, "/flush_cache", {}, API_KEY)[0] == 200
        body = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 16}, "return_logprob": True}
        status, answer = call(server, "/generate", body, API_KEY)
        assert status == 200
        outputs.append(json.loads(answer)["meta_info"]["output_token_logprobs"])
    return outputs


def test_nothing_at_runtime_changes_the_served_mask(server):
    """Rewriting the mask file changes nothing (it is read only while the server starts), and SGLang's weight reload,
    which would restore DeepSeek's unmasked correction bias, is refused."""
    spec = spec_from_model_path(server.model_path)
    served_before, outputs_before = server_info(server.base_url, api_key=API_KEY)[REPORT_KEY], greedy(server, PROMPTS)
    everything = {layer: range(spec.n_experts) for layer in spec.moe_layers}  # read again, it would unmask them all
    ExpertMask.for_spec(spec, everything, "rewritten-while-serving").save(server.mask_path)
    status, answer = call(server, "/update_weights_from_disk", {"model_path": str(server.model_path)}, API_KEY)
    assert status == 400 and "weight updates are refused while an expert mask is served" in json.loads(answer)["message"]

    def sampled():
        for prompt in PROMPTS:
            body = {"text": prompt, "sampling_params": {"temperature": 1.0, "max_new_tokens": 80, "ignore_eos": True}}
            assert call(server, "/generate", body, API_KEY)[0] == 200

    counts = record_expert_counts(server.base_url, server.recorder_dir, sampled, api_key=API_KEY)  # [L, E]
    for layer, kept in MASKS[MASK].items():
        pruned = sorted(set(range(spec.n_experts)) - set(kept))
        assert counts[layer, pruned].sum() == 0 and counts[layer, kept].sum() > 100 * spec.top_k
    assert greedy(server, PROMPTS) == outputs_before
    assert server_info(server.base_url, api_key=API_KEY)[REPORT_KEY] == served_before
