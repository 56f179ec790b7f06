"""Fail closed: the server answers no request unless every worker applied what the launcher asked for.

Installed by `load_plugin` in every SGLang process when our server entry (serve.py) set EASYEP_RUN_DIR:
- in a scheduler, an exception raised while it starts (our hooks or SGLang's own code) leaves its one-line
  cause in RUN_DIR/<pid>.failed, which serve.py prints when it stops the server;
- each scheduler adds a `WorkerReport` to the init info it sends the server when it is ready (what it
  applied, and which of our hook targets did not resolve);
- the server checks every report before it starts its HTTP server, and refuses to start otherwise; then it shows
  them in GET /server_info (served_mask.py).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from easyep_sglang.mask import ExpertMask
from easyep_sglang.sglang_plugin import served_mask
from easyep_sglang.sglang_plugin.server_env import ENV_RUN_DIR, ENV_STATS_DIR, PLUGIN_NAME

SCHEDULER_INIT = "sglang.srt.managers.scheduler.Scheduler.__init__"
SCHEDULER_INIT_INFO = "sglang.srt.managers.scheduler.Scheduler.get_init_info"
WAIT_FOR_SCHEDULERS = "sglang.srt.entrypoints.engine._wait_for_scheduler_ready"
WEIGHT_UPDATES = tuple(f"sglang.srt.model_executor.model_runner_components.weight_updater.WeightUpdater.{method}"
                       for method in ("update_weights_from_disk", "load_weights_from_distributed",
                                      "update_weights_from_tensor", "update_weights_from_ipc"))
REPORT_KEY = "easyep"  # in a scheduler's init info
FAILED_SUFFIX = ".failed"


class FailClosed(RuntimeError):
    """A worker did not apply what was asked; the server must not serve."""


@dataclass
class WorkerReport:
    worker: str  # process title, e.g. sglang::scheduler_TP1
    pid: int
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

        _report = WorkerReport(setproctitle.getproctitle(), os.getpid())
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
    HookRegistry.register(SCHEDULER_INIT_INFO, _add_report, HookType.AFTER)
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
        cause = f"{type(err).__name__}: {err}".splitlines()[0]
        path = Path(os.environ[ENV_RUN_DIR]) / f"{os.getpid()}{FAILED_SUFFIX}"
        path.write_text(f"{report().worker} (pid {os.getpid()}) failed while starting: {cause}\n")
        raise


def startup_failures(run_dir: str | Path) -> list[str]:
    return [p.read_text().strip() for p in sorted(Path(run_dir).glob("*" + FAILED_SUFFIX))]


def _add_report(info: dict, scheduler, *args, **kwargs) -> dict:
    report().unresolved = unresolved_targets()
    return {**info, REPORT_KEY: report()}


def _check_reports(infos: list[dict], *args, **kwargs) -> list[dict]:
    """Refuse to serve unless every scheduler applied what was asked; then show it in GET /server_info."""
    from sglang.srt.runtime_context import get_model

    served = served_mask.requested(get_model().model_path)
    for rank, info in enumerate(infos):
        problem = _problem(info.get(REPORT_KEY), served)
        if problem:
            raise FailClosed(f"scheduler {rank}: {problem}; refusing to serve")
    schedulers_ready.set()
    return served_mask.publish(infos, [info[REPORT_KEY] for info in infos], served)


def _problem(got: WorkerReport | None, served: served_mask.ServedMask) -> str | None:
    if got is None:
        return (f"it did not report, so the {PLUGIN_NAME} plugin did not run in it (check SGLANG_PLUGINS and "
                "the plugin load errors in its log)")
    name = f"{got.worker} (pid {got.pid})"
    if got.unresolved:
        return f"{name}: hook targets did not resolve in this SGLang: {', '.join(got.unresolved)}"
    if served.applied_by_workers:
        layers = served.target_layers
        if got.mask_digest != served.mask_digest or not set(layers) <= set(got.mask_layers):
            return (f"{name} applied mask {got.mask_digest} on layers {got.mask_layers}, "
                    f"expected {served.mask_digest} on layers {layers}")
        if served.mode != "mask" and not set(layers) <= set(got.pruned_layers):
            return f"{name} built only the kept experts of layers {got.pruned_layers}, expected {layers}"
    if os.environ.get(ENV_STATS_DIR) and not got.recorder:
        return f"{name} did not start the calibration recorder"
    return None
