"""Start our launcher as a child process, wait until it serves, and always stop it by PID.

Used by the tests and the bench scripts, so every server they start is shut down, process group
and all, even when the caller fails.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchedServer:
    def __init__(self, model_path: str | Path, *, mask: str | Path | None = None, extra_args: list[str] = (),
                 env: dict[str, str] | None = None, log_path: str | Path | None = None, startup_timeout: float = 300):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        args = ["--model-path", str(model_path), "--host", "127.0.0.1", "--port", str(self.port), *extra_args]
        if mask:
            args += ["--mask", str(mask)]
        self.command = [sys.executable, "-m", "easyep_sglang.launch", *args]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LaunchedServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.spawn()
        self.wait_until_healthy()

    def spawn(self) -> None:
        """Start the process. The kernel ends it when the calling *thread* exits (PR_SET_PDEATHSIG), so call this
        from a thread that outlives the server."""
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_terminate_with_parent)

    def wait_until_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during startup; {self._log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"server not healthy after {self.startup_timeout:.0f}s; {self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        if self.log_path is None:
            return "no log (pass log_path)"
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"log: {self.log_path}; its last lines:\n" + "\n".join(tail)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None and not _group_alive(self.proc.pid):
            return
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            deadline = time.monotonic() + wait
            while _group_alive(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _group_alive(self.proc.pid):
                return

    def pids(self) -> list[int]:
        """PIDs of the server's process group (server, schedulers, detokenizer)."""
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == self.proc.pid]


class LoopbackNodes:
    """One SGLang server spread over `nnodes` nodes simulated on this machine: a launcher per node, joined by SGLang's
    --nnodes/--node-rank/--dist-init-addr on loopback, each node bound to its share of the cores. Node 0 serves the
    API at `base_url`; a node past 0 runs its TP ranks and only a health endpoint. Same interface as LaunchedServer.
    """

    def __init__(self, model_path: str | Path, *, nnodes: int, mask: str | Path | None = None,
                 extra_args: list[str] = (), env: dict[str, str] | None = None, log_path: str | Path,
                 startup_timeout: float = 300):
        from easyep_sglang.sglang_plugin.server_env import split_cores

        address = f"127.0.0.1:{free_port()}"
        log_path = Path(log_path)
        self.nodes = [
            LaunchedServer(model_path, mask=mask, startup_timeout=startup_timeout,
                           extra_args=[*extra_args, "--nnodes", str(nnodes), "--node-rank", str(rank),
                                       "--dist-init-addr", address],
                           env={**(env or {}), "SGLANG_CPU_OMP_THREADS_BIND": cores},
                           log_path=log_path if rank == 0 else log_path.with_suffix(f".node{rank}{log_path.suffix}"))
            for rank, cores in enumerate(split_cores(nnodes))]
        self.base_url, self.log_path = self.nodes[0].base_url, self.nodes[0].log_path

    @property
    def log_paths(self) -> list[Path]:
        return [node.log_path for node in self.nodes]

    def start(self) -> None:
        self.spawn()
        self.wait_until_healthy()

    def spawn(self) -> None:
        for node in self.nodes:
            node.spawn()

    def wait_until_healthy(self) -> None:
        try:
            for node in self.nodes:
                node.wait_until_healthy()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Node 0 first: SGLang's other nodes ignore SIGTERM and stop when node 0 sends their schedulers ShutdownReq."""
        for node in self.nodes:
            node.stop()

    def pids(self) -> list[int]:
        return [pid for node in self.nodes for pid in node.pids()]


def _terminate_with_parent() -> None:
    # If the caller dies without stopping us (killed test run), the server still gets SIGTERM.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
