"""Report rows shared by the benchmarks and the accuracy harness: what produced a number, and where.

Every row is one JSON line holding `provenance(...)` (code, engine, device, model, mask) beside its
metrics, so a figure can be traced to the exact server that produced it. Server facts are read from
SGLang's own `GET /server_info`, so a row describes the server that answered, not the client's guess.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from easyep_sglang.fileio import atomic_write_text
from easyep_sglang.mask import ExpertMask
from easyep_sglang.spec import spec_from_model_path

REPO_DIR = Path(__file__).resolve().parents[1]


def git_commit(repo: Path = REPO_DIR) -> str:
    """HEAD of the checkout this code runs from, '+dirty' when files differ; 'unknown' outside git."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "none (no commit yet)" if "HEAD" in head.stderr else "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def server_info(base_url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(base_url.rstrip("/") + "/server_info", timeout=timeout) as resp:
        return json.load(resp)


def cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def moe_kernel_path(info: dict) -> str:
    """Which routing and expert kernels SGLang 0.5.23 runs for this server (a label, derived from the
    device and backend settings; the mask itself always acts in select_experts or the correction bias)."""
    device = info.get("device") or "unknown"
    if device == "cpu":
        # unquant.py forward_cpu: AMX uses sgl_kernel's fused_experts_cpu, otherwise moe_forward_native.
        experts = "sgl-kernel fused_experts_cpu (AMX)" if cpu_has_amx() else "torch-native moe_forward_native"
        return f"cpu/torch-native select_experts + {experts}"
    return f"{device}/select_experts + moe-runner-backend={info.get('moe_runner_backend', 'auto')}"


def _mask_facts(mask_path: str | Path | None, model_path: str | Path | None) -> dict:
    if not mask_path:
        return {"mask": None, "mask_digest": None}
    mask = ExpertMask.load(mask_path)
    facts = {"mask": str(mask_path), "mask_digest": mask.digest(), "mask_method": mask.method}
    if model_path and Path(model_path, "config.json").is_file():
        spec = spec_from_model_path(model_path)
        resolved = mask.resolve(spec)
        counts = [len(resolved.get(layer, range(spec.n_experts))) for layer in spec.moe_layers]
        facts["experts_per_layer"] = {"min": min(counts), "max": max(counts), "mean": sum(counts) / len(counts)}
    return facts


def provenance(base_url: str, *, mask_path: str | Path | None = None, model_path: str | Path | None = None) -> dict:
    """Everything a report row needs to say what produced it. `model_path` defaults to the server's."""
    try:
        info = server_info(base_url)
    except (OSError, ValueError) as err:  # not an SGLang server, or an old one: the row says so
        info = {"server_info_error": f"{type(err).__name__}: {err}"}
    model_path = model_path or info.get("model_path")
    row = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "easyep_sglang_version": _version("easyep-sglang"),
        "sglang_version": info.get("version"),
        "device": info.get("device"),
        "host_cpus": os.cpu_count(),
        "host_load_1m": round(os.getloadavg()[0], 2),  # other work on the host skews CPU numbers
        "moe_kernel_path": moe_kernel_path(info),
        "model": str(model_path),
        "served_model_path": info.get("model_path"),
        "tp_size": info.get("tp_size"),
        "mem_fraction_static": info.get("mem_fraction_static"),
        "max_total_num_tokens": info.get("max_total_num_tokens"),
        "server_info_error": info.get("server_info_error"),
    }
    memory = (info.get("internal_states") or [{}])[0].get("memory_usage") or {}
    row["server_weight_gb"], row["server_kvcache_gb"] = memory.get("weight"), memory.get("kvcache")
    if model_path and Path(model_path, "config.json").is_file():
        spec = spec_from_model_path(model_path)
        row.update(architecture=spec.architecture, model_fingerprint=spec.fingerprint, n_experts=spec.n_experts)
    return {**row, **_mask_facts(mask_path, model_path)}


def append_row(path: str | Path, row: dict) -> None:
    """Append one JSON line; the file is rewritten atomically, so a crash never leaves half a row."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + json.dumps(row, sort_keys=True) + "\n")


def read_rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"
