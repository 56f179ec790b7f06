"""Report rows shared by the benchmarks and the accuracy harness: what produced a number, and where.

Every row is one JSON line holding `provenance(...)` (code, engine, device, model, mask) beside its
metrics, so a figure can be traced to the exact server that produced it. Server facts are read from
SGLang's own `GET /server_info`, so a row describes the server that answered, not the client's guess:
the mask a row names must be the one the server reports serving (sglang_plugin/served_mask.py), or no
row is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from easyep_sglang import __version__
from easyep_sglang.checkpoint.pruned_checkpoint import read_pruned_checkpoint
from easyep_sglang.core.fileio import atomic_write_text
from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.core.spec import MoESpec, spec_from_model_path
from easyep_sglang.sglang_plugin.served_mask import REPORT_KEY

REPO_DIR = Path(__file__).resolve().parents[2]


class ServedMaskMismatch(ValueError):
    """The mask a row names is not the one the server reports serving; the row is refused."""


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


def server_info(base_url: str, timeout: float = 30, api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(base_url.rstrip("/") + "/server_info", headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as resp:
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


def routing_spec(model_path: str | Path) -> MoESpec:
    """The expert space a mask of this model names: the source model's for an offline-pruned checkpoint."""
    pruned = read_pruned_checkpoint(model_path)
    return pruned.source_spec if pruned else spec_from_model_path(model_path)


def _mask_facts(mask_path: str | Path | None, model_path: str | Path | None) -> dict:
    if not mask_path:
        return {"mask": None, "mask_digest": None}
    mask = ExpertMask.load(mask_path)
    facts = {"mask": str(mask_path), "mask_digest": mask.digest(), "mask_method": mask.method}
    if model_path and Path(model_path, "config.json").is_file():
        spec = routing_spec(model_path)
        resolved = mask.resolve(spec)
        counts = [len(resolved.get(layer, range(spec.n_experts))) for layer in spec.moe_layers]
        facts["experts_per_layer"] = {"min": min(counts), "max": max(counts), "mean": sum(counts) / len(counts)}
    return facts


def _digest_when_served(mask_path: str | Path | None, model_path: str | Path | None) -> str | None:
    """The digest a server of this mask reports: that of the mask resolved against the model (served_mask.py)."""
    if not mask_path:
        return None
    mask = ExpertMask.load(mask_path)
    if not (model_path and Path(model_path, "config.json").is_file()):
        return mask.digest()  # equal for a mask as select writes it (sorted ids, restricted layers only)
    return ExpertMask(mask.resolve(routing_spec(model_path))).digest()


def served_mask_facts(info: dict, base_url: str, mask_path: str | Path | None, model_path: str | Path | None) -> dict:
    """The mask the server reports serving; raises ServedMaskMismatch unless it is `mask_path` (None: no mask)."""
    served = info.get(REPORT_KEY)
    if served is None:
        if mask_path:
            why = info.get("server_info_error") or f"its GET /server_info has no {REPORT_KEY!r} block"
            raise ServedMaskMismatch(f"the server at {base_url} does not report the mask it serves ({why}), so mask "
                                     f"{mask_path} cannot be checked; serve it with python -m easyep_sglang.launch")
        return {"served_mask": None, "served_mask_digest": None}
    expected = _digest_when_served(mask_path, model_path)
    if served["mask_digest"] != expected:
        serves = (f"mask {served['mask_digest']} ({served['mode']}, {served['kept']} experts kept in layers "
                  f"{served['layers']})" if served["mask_digest"] else "every expert (no mask)")
        names = f"mask {mask_path} ({expected})" if mask_path else "no mask"
        fix = "pass --mask with the mask file the server was started with" if served["mask_digest"] else "drop --mask"
        raise ServedMaskMismatch(f"the row names {names}, but the server at {base_url} serves {serves}; {fix}")
    return {"served_mask": served, "served_mask_digest": served["mask_digest"]}


def provenance(base_url: str, *, mask_path: str | Path | None = None, model_path: str | Path | None = None,
               api_key: str | None = None) -> dict:
    """Everything a report row needs to say what produced it. `model_path` defaults to the server's; `api_key` is
    the server's --api-key, if it has one.

    Raises ServedMaskMismatch when `mask_path` (None: the full model) is not what the server reports serving."""
    try:
        info = server_info(base_url, api_key=api_key)
    except (OSError, ValueError) as err:  # not an SGLang server, or an old one: the row says so
        info = {"server_info_error": f"{type(err).__name__}: {err}"}
    model_path = model_path or info.get("model_path")
    row = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "easyep_sglang_version": __version__,
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
    served = served_mask_facts(info, base_url, mask_path, model_path)  # raises on a mismatch: no row
    return {**row, **_mask_facts(mask_path, model_path), **served}


def append_row(path: str | Path, row: dict) -> None:
    """Append one JSON line; the file is rewritten atomically, so a crash never leaves half a row."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + json.dumps(row, sort_keys=True) + "\n")


def read_rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
