"""The server process: SGLang's launch_server run here, stopped within seconds when a worker fails to start.

    python -m easyep_sglang.sglang_plugin.serve [sglang.launch_server arguments]   (the launcher execs this)

It does what `python -m sglang.launch_server` does (load plugins, parse, run_server), and also:
- with a mask, pruning or the recorder requested, our plugin must have run here with every hook target
  patched, else it refuses to start (fail_closed.py then checks each scheduler before the HTTP server starts);
- a scheduler that raises while starting sends this process SIGQUIT (run_scheduler_process), and SGLang's
  launch-phase handler SIGKILLs the tree without a word of why. Ours (ServerArgs.custom_sigquit_handler)
  prints the worker's one-line cause, stops the children and exits 1;
- a watchdog thread does the same when a worker process exits before every scheduler reported ready, for
  failures that send no SIGQUIT (a worker killed, or a hang in this process's startup).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import traceback
from pathlib import Path

from easyep_sglang import sglang_plugin
from easyep_sglang.sglang_plugin import fail_closed
from easyep_sglang.sglang_plugin.settings import PluginSettings

WATCH_INTERVAL_S = 0.5
_stopping = threading.Lock()


def main(argv: list[str] | None = None) -> None:
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    settings = dataclasses.replace(PluginSettings.from_env(), run_dir=Path(tempfile.mkdtemp(prefix="easyep-server-")))
    os.environ.update(settings.to_env())
    load_plugins()
    if sglang_plugin.loaded:
        unresolved = fail_closed.unresolved_targets()
        if unresolved:
            _stop(f"server process: hook targets did not resolve in this SGLang: {', '.join(unresolved)}")
        threading.Thread(target=_watch, args=(settings.run_dir,), name="easyep-startup-watchdog", daemon=True).start()
    elif settings.changes_the_model:
        _stop("server process: the easyep plugin did not load (SGLANG_PLUGINS, or a load error logged above)")
    server_args = prepare_server_args(sys.argv[1:] if argv is None else argv)
    server_args.custom_sigquit_handler = _on_sigquit
    try:
        run_server(server_args)
    except fail_closed.FailClosed as err:
        _stop(str(err))
    except Exception as err:
        traceback.print_exc()
        _stop(f"server process: {type(err).__name__}: {err}")
    finally:
        shutil.rmtree(settings.run_dir, ignore_errors=True)
        kill_process_tree(os.getpid(), include_parent=False)


def _on_sigquit(signum, frame) -> None:
    # run_scheduler_process (and the detokenizer) send SIGQUIT to this process when they fail.
    _stop("a worker process signalled a failure (SIGQUIT); its traceback is above")


def _watch(run_dir: Path) -> None:
    workers = {}
    while not fail_closed.schedulers_ready.wait(WATCH_INTERVAL_S):
        workers.update((proc.pid, proc) for proc in multiprocessing.active_children())
        dead = [proc for proc in workers.values() if proc.exitcode is not None]
        if dead or fail_closed.startup_failures(run_dir):
            _stop(f"worker pid {dead[0].pid} exited with code {dead[0].exitcode} before the server was ready; "
                  "its output is above" if dead else "")
    shutil.rmtree(run_dir, ignore_errors=True)  # failures are recorded only while the schedulers start


def _stop(reason: str) -> None:
    """Print one line naming the failed worker and its cause, stop every child process, exit 1."""
    from sglang.srt.utils import kill_process_tree

    with _stopping:
        run_dir = PluginSettings.from_env().run_dir
        causes = fail_closed.startup_failures(run_dir) or [reason]
        print(f"easyep: error: server stopped before serving: {'; '.join(causes)}", file=sys.stderr, flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            kill_process_tree(os.getpid(), include_parent=False, wait_timeout=None)
        finally:
            os._exit(1)


if __name__ == "__main__":
    from easyep_sglang.sglang_plugin import serve  # by its import name, so workers can unpickle our SIGQUIT handler

    serve.main()
