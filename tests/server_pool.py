"""The test session's SGLang servers, planned: each named server starts once, ahead of its first use, and
stops after its last.

A test names the servers it uses with `@pytest.mark.servers("mask:deepseek_v3/varying", "plain:{arch}/fp32")`;
"{...}" is filled in from the test's parameters. After collection the pool knows the order of every use,
so a thread starts the next servers (at most MAX_STARTING at a time, MAX_ALIVE alive, a TP=2 server counting
twice) while earlier tests run, and a server is stopped, also in the background, as soon as the last test
that named it has finished. A start costs about a minute of CPU (three Python processes importing SGLang),
the suite's dominant cost: fewer servers, and the overlap, are what keep the suite short.

Server names and what each serves: server_specs.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from easyep_sglang.checkpoint.prune import prune_checkpoint
from easyep_sglang.core.mask import ExpertMask
from easyep_sglang.core.spec import spec_from_model_path
from easyep_sglang.demo.server import DEMO_MODEL
from easyep_sglang.serving.server_process import LaunchedServer, LoopbackNodes
from expert_distribution import RECORDER_DIR_ENV, RECORDER_SERVER_ARGS
from server_specs import DTYPES, MASKS, VARIANTS, masked_model, server_spec

MAX_ALIVE = int(os.environ.get("EASYEP_TEST_MAX_SERVERS", "6"))  # ~2 GB each; fewer on a machine short of memory
MAX_STARTING = int(os.environ.get("EASYEP_TEST_MAX_STARTING", "2"))
STARTUP_TIMEOUT_S = 600  # several servers start at once on two cores


def witnessed_server(model: Path, mask: Path | None, args: tuple[str, ...], workdir: Path,
                     record_stats: bool = False, nnodes: int = 1) -> LaunchedServer | LoopbackNodes:
    """A (not yet started) server with SGLang's expert-distribution recorder dumping into `workdir`
    (`server.recorder_dir`) and, with `record_stats`, our statistics recorder into `server.stats_dir`. Its log is
    `workdir/server.log` (node N's: server.nodeN.log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    extra = (*RECORDER_SERVER_ARGS, *args, *(("--record-stats", str(workdir / "stats")) if record_stats else ()))
    common = dict(mask=mask, extra_args=list(extra), env={RECORDER_DIR_ENV: str(workdir)},
                  log_path=workdir / "server.log", startup_timeout=STARTUP_TIMEOUT_S)
    server = LoopbackNodes(model, nnodes=nnodes, **common) if nnodes > 1 else LaunchedServer(model, **common)
    server.model_path, server.mask_path = model, mask
    server.recorder_dir, server.stats_dir = workdir, workdir / "stats"
    return server


class ModelStore:
    """Tiny checkpoints, test masks and offline-pruned checkpoints, each built once, on first request."""

    def __init__(self, root: Path):
        self.root = root
        self._lock = threading.RLock()
        self._built: dict[str, Path] = {}

    def model(self, key: str) -> Path:
        """The model directory of "ARCH/DTYPE", "demo" or "offline/MASK"."""
        if key == "demo":
            return Path(str(DEMO_MODEL))
        with self._lock:
            if key not in self._built:
                self._built[key] = self._build(key)
            return self._built[key]

    def mask(self, name: str) -> Path:
        with self._lock:
            if f"mask/{name}" not in self._built:
                arch = name.split("/")[0]
                spec = spec_from_model_path(self.model(masked_model(arch)))
                keep = MASKS[name]
                if keep == "all":
                    keep = {layer: range(spec.n_experts) for layer in spec.moe_layers}
                path = self.root / "masks" / f"{name.replace('/', '-')}.json"
                ExpertMask.for_spec(spec, keep, name).save(path)
                self._built[f"mask/{name}"] = path
            return self._built[f"mask/{name}"]

    def _build(self, key: str) -> Path:
        out = self.root / key.replace("/", "-")
        if key.startswith("offline/"):
            mask = key.removeprefix("offline/")
            prune_checkpoint(self.model(masked_model(mask.split("/")[0])), self.mask(mask), out)
            return out
        arch, dtype = key.split("/")
        arch, flags = VARIANTS.get(arch, (arch, ()))
        # In a child process: a build draws from torch's global random generator, which the tests running meanwhile
        # in the main thread draw from too (the pool builds ahead in its thread), and would then differ from run to run.
        command = [sys.executable, "-m", "easyep_sglang.demo_model", "--arch", arch, "--dtype", DTYPES[dtype],
                   "--out", str(out), *flags]
        built = subprocess.run(command, capture_output=True, text=True)
        if built.returncode:
            raise RuntimeError(f"building {key} failed: {built.stderr.strip()[-2000:]}")
        return out


class ServerPool:
    def __init__(self, store: ModelStore, root: Path, plan: list[list[str]]):
        self.store, self.root = store, root
        self.uses: dict[str, list[int]] = {}  # name -> indices of the tests (in run order) that use it
        for index, names in enumerate(plan):
            for name in names:
                self.uses.setdefault(name, []).append(index)
        self.position = 0  # index of the running test
        self.servers: dict[str, LaunchedServer] = {}  # started or starting
        self.ready: dict[str, threading.Event] = {}
        self.errors: dict[str, BaseException] = {}
        self.startup_s: list[tuple[str, float]] = []  # (name, seconds from spawn to healthy), in start order
        self.waited_s = 0.0  # how long tests waited for a server still starting
        self._cond = threading.Condition()
        self._closed = False
        self._stoppers: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._start_ahead, name="server-pool", daemon=True)
        self._thread.start()

    # --- called by the tests and the pytest hooks -------------------------------------------------------
    def use(self, name: str) -> LaunchedServer:
        """The running server `name`, started now if it was not started ahead."""
        with self._cond:
            self.uses.setdefault(name, []).append(self.position)
            if name not in self.servers:
                self._make_room(server_spec(name).weight)
                self._launch(name)
            event = self.ready[name]
        began = time.monotonic()
        event.wait()
        with self._cond:
            self.waited_s += time.monotonic() - began
        if name in self.errors:
            raise RuntimeError(f"test server {name} did not start: {self.errors[name]}")
        return self.servers[name]

    def serving(self, names: list[str]) -> bool:
        """Whether every one of these servers has finished starting (or failed to: its test reports that)."""
        with self._cond:
            return all(name in self.ready and self.ready[name].is_set() for name in names)

    def enter(self, index: int) -> None:
        with self._cond:
            self.position = index
            self._cond.notify_all()

    def leave(self, index: int) -> None:
        """After test `index`: stop every server no later test uses."""
        with self._cond:
            self.position = index + 1
            for name in [n for n in self.servers if self._next_use(n, self.position) is None]:
                self._stop(name)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for name in list(self.servers):
                self._stop(name)
            self._cond.notify_all()
        for thread in self._stoppers:
            thread.join()

    def summary(self) -> str:
        if not self.startup_s:
            return "test servers: none started"
        times = sorted(seconds for _, seconds in self.startup_s)
        return (f"test servers: {len(times)} started, {sum(times):.0f} s of start-up in all "
                f"(min {times[0]:.0f} s, median {times[len(times) // 2]:.0f} s, max {times[-1]:.0f} s); "
                f"tests waited {self.waited_s:.0f} s for one to start; failed: {sorted(self.errors) or 'none'}\n"
                "test server start-ups, in order: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.startup_s))

    # --- internals, under self._cond ----------------------------------------------------------------------
    def _next_use(self, name: str, after: int) -> int | None:
        return next((i for i in self.uses.get(name, ()) if i >= after), None)

    def _distance(self, name: str) -> float:
        """Tests until `name` is used again; infinite if never."""
        following = self._next_use(name, self.position)
        return float("inf") if following is None else following - self.position

    def _load(self) -> int:
        return sum(server_spec(n).weight for n in self.servers)

    def _make_room(self, weight: int) -> None:
        """Stop the ready servers used furthest in the future (none the running test uses) until `weight` more fits."""
        while self._load() + weight > MAX_ALIVE:
            candidates = [n for n in self.servers if self.ready[n].is_set() and self.position not in self.uses[n]]
            if not candidates:
                return  # everything alive is still starting or in use: run over the limit rather than wait
            self._stop(max(candidates, key=self._distance))

    def _launch(self, name: str) -> None:
        spec = server_spec(name)
        model = self.store.model(spec.model)
        mask = self.store.mask(spec.mask) if spec.mask else None
        server = witnessed_server(model, mask, spec.args, self.root / name.replace("/", "-").replace(":", "-"),
                                  spec.record_stats, spec.nnodes)
        server.name = name
        self.servers[name], self.ready[name] = server, threading.Event()
        # Spawned here, in the pool's thread or the tests' main thread, which live as long as the server: the
        # kernel stops a server whose spawning thread exits. A short-lived thread only waits for health.
        began = time.monotonic()
        server.spawn()
        threading.Thread(target=self._wait_healthy, args=(name, server, self.ready[name], began), name=f"start {name}",
                         daemon=True).start()

    def _wait_healthy(self, name: str, server: LaunchedServer, ready: threading.Event, began: float) -> None:
        try:
            server.wait_until_healthy()
            failure = None
        except BaseException as err:  # reported to the test that uses it
            failure = err
        with self._cond:
            if self.servers.get(name) is server:  # not stopped meanwhile (the session ending)
                self.startup_s.append((name, time.monotonic() - began))
                if failure:
                    self.errors[name] = failure
            ready.set()
            self._cond.notify_all()

    def _stop(self, name: str) -> None:
        server = self.servers.pop(name)
        self.ready.pop(name)
        self.errors.pop(name, None)
        thread = threading.Thread(target=server.stop, name=f"stop {name}", daemon=True)
        thread.start()
        self._stoppers.append(thread)

    def _start_ahead(self) -> None:
        with self._cond:
            while not self._closed:
                starting = sum(1 for n in self.servers if not self.ready[n].is_set())
                upcoming = sorted((i, n) for n in self.uses if n not in self.servers
                                  if (i := self._next_use(n, self.position)) is not None)
                if upcoming and starting < MAX_STARTING:
                    name = upcoming[0][1]
                    if self._load() + server_spec(name).weight <= MAX_ALIVE:
                        try:
                            self._launch(name)
                        except Exception as err:  # e.g. a model that fails to build: the test reports it
                            print(f"server pool: cannot start {name}: {err}", file=sys.stderr)
                            self.uses.pop(name)
                        continue
                self._cond.wait(timeout=1.0)
