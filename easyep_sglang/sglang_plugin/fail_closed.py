"""Fail closed: the server answers no request unless every worker applied what the launcher asked for.

Installed by `load_plugin` in every SGLang process when our server entry (serve.py) set the run directory
(PluginSettings.run_dir):
- in a scheduler, an exception raised while it starts (our hooks or SGLang's own code) leaves its one-line
  cause in RUN_DIR/<pid>.failed, which serve.py prints when it stops the server;
- each scheduler, when it is ready, gathers every rank's `WorkerReport` (what it applied, and which of our hook
  targets did not resolve) over SGLang's world group, so the reports of ranks on other nodes reach this node,
  and adds them to the init info it sends its server; a DP controller passes its schedulers' reports on;
- the server checks every report before it starts its HTTP server, and refuses to start otherwise; then it shows
  them in GET /server_info (served_mask.py). On several nodes every node's server checks every rank.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.serving.launch_checks import DRAFT_MODEL_ALGORITHMS
from easyep_sglang.sglang_plugin import served_mask
from easyep_sglang.sglang_plugin.server_env import PLUGIN_NAME
from easyep_sglang.sglang_plugin.settings import PluginSettings

SCHEDULER_INIT = "sglang.srt.managers.scheduler.Scheduler.__init__"
SCHEDULER_INIT_INFO = "sglang.srt.managers.scheduler.Scheduler.get_init_info"
DP_CONTROLLER_INIT_INFO = "sglang.srt.managers.data_parallel_controller.DataParallelController.get_init_info"
WAIT_FOR_SCHEDULERS = "sglang.srt.entrypoints.engine._wait_for_scheduler_ready"
WEIGHT_UPDATES = tuple(f"sglang.srt.model_executor.model_runner_components.weight_updater.WeightUpdater.{method}"
                       for method in ("update_weights_from_disk", "load_weights_from_distributed",
                                      "update_weights_from_tensor", "update_weights_from_ipc"))
REPORT_KEY = "easyep"  # in a scheduler's init info: the reports of every rank of its world
FAILED_SUFFIX = ".failed"
# How long a ready scheduler waits for the other ranks to report. The ranks leave model loading (and CUDA graph
# capture) in step, since both end in collectives, so a rank missing after this never loaded our hooks.
REPORT_WAIT_S = 120


class FailClosed(RuntimeError):
    """A worker did not apply what was asked; the server must not serve."""


@dataclass
class WorkerReport:
    worker: str  # process title, e.g. sglang::scheduler_TP1
    pid: int
    host: str = ""  # the machine (node) it runs on
    rank: int = 0  # its rank in SGLang's world group (TP x PP x attention DP, over every node)
    unresolved: list[str] = field(default_factory=list)  # our hook targets that SGLang could not patch
    mask_digest: str | None = None  # ExpertMask digest of the kept experts the gate mask applied
    mask_layers: list[int] = field(default_factory=list)  # layers whose router the mask restricted
    kept: int = 0  # experts kept over those layers
    pruned_layers: list[int] = field(default_factory=list)  # layers built with only their kept experts
    recorder: bool = False  # the calibration recorder is on


_report: WorkerReport | None = None
schedulers_ready = threading.Event()  # set in the server process once every report checked out


def report() -> WorkerReport:
    """This process's report; the hooks that apply the mask, the pruning and the recorder fill it in."""
    global _report
    if _report is None:
        import setproctitle

        _report = WorkerReport(setproctitle.getproctitle(), os.getpid(), socket.gethostname())
    return _report


def record_mask(keep: dict[int, tuple[int, ...]], applied: list[int], kept: int) -> None:
    served = report()
    served.mask_digest = ExpertMask(keep).digest()
    served.mask_layers = sorted({*served.mask_layers, *applied})  # the MTP draft model adds its layers
    served.kept += kept


def record_pruned(layers: list[int]) -> None:
    report().pruned_layers = sorted({*report().pruned_layers, *layers})


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(SCHEDULER_INIT, _record_startup_failure, HookType.AROUND)
    HookRegistry.register(SCHEDULER_INIT_INFO, _add_reports, HookType.AFTER)
    HookRegistry.register(DP_CONTROLLER_INIT_INFO, _pass_reports_on, HookType.AFTER)
    HookRegistry.register(WAIT_FOR_SCHEDULERS, _check_reports, HookType.AFTER)


def install_weight_update_guard() -> None:
    """With a mask served: SGLang's runtime weight updates (/update_weights_from_disk, _from_tensor, _from_distributed,
    _from_ipc) reload DeepSeek's correction bias and the expert tensors without our load-time hooks, so the mask
    would silently stop applying while /server_info still showed it. Each worker refuses them instead."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target in WEIGHT_UPDATES:
        HookRegistry.register(target, _refuse_weight_update, HookType.AROUND)


def _refuse_weight_update(update, updater, *args, **kwargs) -> tuple[bool, str]:
    return False, ("easyep: weight updates are refused while an expert mask is served, since reloading weights would "
                   "undo the mask applied at load time; restart the server on the new weights "
                   "(python -m easyep_sglang.launch ...)")


def unresolved_targets() -> list[str]:
    """Our hook targets that HookRegistry could not patch (it logs them and carries on)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    ours = [t for t, hooks in HookRegistry._hooks.items() if any(s and s.plugin_name == PLUGIN_NAME for *_, s in hooks)]
    return sorted(t for t in ours if t not in HookRegistry._patched)


def _record_startup_failure(init, scheduler, *args, **kwargs):
    try:
        unresolved = unresolved_targets()
        if unresolved:  # before the model loads, so the server stops in seconds
            raise FailClosed(f"hook targets did not resolve in this SGLang: {', '.join(unresolved)}")
        return init(scheduler, *args, **kwargs)
    except Exception as err:
        _leave_cause(err)
        raise


def _leave_cause(err: Exception) -> None:
    """One line for serve.py, which prints it when it stops the server (unless another worker's cause already
    stopped it, and the run directory is gone)."""
    cause = f"{type(err).__name__}: {err}".splitlines()[0]
    path = PluginSettings.from_env().run_dir / f"{os.getpid()}{FAILED_SUFFIX}"
    with contextlib.suppress(FileNotFoundError):
        path.write_text(f"{report().worker} (pid {os.getpid()}) failed while starting: {cause}\n")


def startup_failures(run_dir: str | Path) -> list[str]:
    return [p.read_text().strip() for p in sorted(Path(run_dir).glob("*" + FAILED_SUFFIX))]


def _add_reports(info: dict, scheduler, *args, **kwargs) -> dict:
    own = report()
    own.unresolved = unresolved_targets()
    try:
        return {**info, REPORT_KEY: _gather(own)}
    except Exception as err:
        _leave_cause(err)
        raise


def _gather(own: WorkerReport) -> list[WorkerReport]:
    """Every rank's report, over the CPU (gloo) communicator of SGLang's world group: all TP, PP and attention-DP
    ranks of this model, on every node. Each rank calls this once, when its scheduler is ready."""
    import torch.distributed as dist
    from sglang.srt.distributed.parallel_state import get_world_group

    world = get_world_group()
    own.rank = world.rank_in_group
    if world.world_size == 1:
        return [own]
    if dist.get_backend(world.cpu_group) == "gloo":  # monitored_barrier (gloo only) names the ranks that never came
        try:
            dist.monitored_barrier(world.cpu_group, timeout=timedelta(seconds=REPORT_WAIT_S), wait_all_ranks=True)
        except RuntimeError as err:
            raise FailClosed(f"not every rank reported within {REPORT_WAIT_S} s, so the {PLUGIN_NAME} plugin did not "
                             f"check them ({str(err).splitlines()[0]}); start every node with python -m "
                             f"easyep_sglang.launch and the same --mask, --prune and --record-stats") from None
    reports: list[WorkerReport | None] = [None] * world.world_size
    dist.all_gather_object(reports, own, group=world.cpu_group)
    return reports


def _pass_reports_on(info: dict, controller, *args, **kwargs) -> dict:
    """A DP controller hands its server only a few fields of its schedulers' init infos; add their reports (None
    for a scheduler that sent none)."""
    infos = controller._scheduler_init_infos
    return {**info, REPORT_KEY: [got for each in infos for got in each.get(REPORT_KEY) or [None]]}


def _check_reports(infos: list[dict], *args, **kwargs) -> list[dict]:
    """Refuse to serve unless every scheduler applied what was asked; then show it in GET /server_info."""
    from sglang.srt.runtime_context import get_model, get_spec

    served = served_mask.requested(get_model().model_path)
    draft_model = str(get_spec().speculative_algorithm or "").upper() in DRAFT_MODEL_ALGORITHMS
    reports = _distinct([got for info in infos for got in info.get(REPORT_KEY) or [None]])
    for number, got in enumerate(reports):
        problem = _problem(got, served, draft_model)
        if problem:
            raise FailClosed(f"worker {number}: {problem}; refusing to serve")
    schedulers_ready.set()
    return served_mask.publish(infos, reports, served)


def _distinct(reports: list[WorkerReport | None]) -> list[WorkerReport | None]:
    """Each worker once, in the order received: every rank of a world sends the reports of all its ranks."""
    seen, out = set(), []
    for got in reports:
        key = None if got is None else (got.host, got.pid)
        if key is None or key not in seen:
            seen.add(key)
            out.append(got)
    return out


def _problem(got: WorkerReport | None, served: served_mask.ServedMask, draft_model: bool = False) -> str | None:
    """Why `got` does not show what was asked, or None. draft_model: an MTP/EAGLE draft model runs in each
    scheduler beside the target, and must have masked the MTP layers the mask names (gate_mask.py)."""
    if got is None:
        return (f"it did not report, so the {PLUGIN_NAME} plugin did not run in it (check SGLANG_PLUGINS and "
                "the plugin load errors in its log)")
    name = f"{got.worker} (pid {got.pid} on {got.host})"
    if got.unresolved:
        return f"{name}: hook targets did not resolve in this SGLang: {', '.join(got.unresolved)}"
    if served.applied_by_workers:
        layers = served.target_layers
        masked = sorted(served.keep) if draft_model else layers
        if got.mask_digest != served.mask_digest or not set(masked) <= set(got.mask_layers):
            return (f"{name} applied mask {got.mask_digest} on layers {got.mask_layers}, "
                    f"expected {served.mask_digest} on layers {masked}")
        if served.mode != "mask" and not set(layers) <= set(got.pruned_layers):
            return f"{name} built only the kept experts of layers {got.pruned_layers}, expected {layers}"
    if PluginSettings.from_env().stats_dir and not got.recorder:
        return f"{name} did not start the calibration recorder"
    return None
