"""Run the K tasks on this machine: ``mpiexec -n K`` (MPI backend) or K processes (file backend).

The launcher holds the run directory's lock for the whole run, shows live progress on a terminal,
and turns Ctrl-C / SIGTERM into the checkpoint signal so a local run stops resumably too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..config import Config
from ..errors import LaunchError
from ..gate import Gate
from ..rundir import RunDir
from ..signals import parse_signal
from .progress import Progress


def find_mpiexec() -> str:
    # Prefer the mpiexec installed beside this Python (the venv's mpich wheel): it matches the MPI
    # library mpi4py loads. A cluster's module-provided one on PATH is the fallback.
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise LaunchError("no mpiexec found: install the 'mpich' wheel (pip install 'hpc-mto[mpi]') or load "
                          "your cluster's MPI module")
    return found


def worker_command(run_dir: Path, task: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "hpc_mto.worker", str(run_dir)]
    return cmd + (["--task", str(task)] if task is not None else [])


def worker_pids(roots: list[int]) -> list[int]:
    """The hpc_mto.worker processes among the descendants of ``roots`` (read from /proc)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], list(roots)
    while frontier:
        pid = frontier.pop()
        found.append(pid)
        frontier += [child for child, ppid in parent.items() if ppid == pid]

    def is_worker(pid):  # "python -m hpc_mto.worker ...", not mpiexec whose arguments say the same
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:3] == [b"-m", b"hpc_mto.worker"]
        except OSError:
            return False

    return [pid for pid in found if is_worker(pid)]


class MpichSegments:
    """The /dev/shm segments this run's ranks have mapped. MPICH unlinks its segment in MPI_Finalize,
    so every killed local run would leave 2 MiB behind; only what the run's own processes mapped is
    removed, once they have all exited.

    A rank maps its segment in MPI_Init and keeps it: once each of the ``ranks`` has been seen with
    one, nothing more is read (reading /proc every few seconds for the whole run would cost the
    launcher CPU beside the training it waits for). In the first seconds the ranks are looked at
    at every call: ranks that started early (at the gate) reach MPI_Init and their first steps
    within a second, and one killed there must not take an unseen segment with it."""

    PREFIX = "/dev/shm/mpich"
    EVERY_S, EAGER_S = 2.0, 30.0

    def __init__(self, ranks: int):
        self.ranks = ranks
        self.seen: set[str] = set()
        self.found_in: set[int] = set()
        self._eager_until = time.monotonic() + self.EAGER_S
        self._next = 0.0

    def look(self, roots: list[int]) -> None:
        now = time.monotonic()
        if len(self.found_in) >= self.ranks or now < self._next:
            return
        self._next = now + (0.0 if now < self._eager_until else self.EVERY_S)
        for pid in set(worker_pids(roots)) - self.found_in:
            try:
                maps = Path(f"/proc/{pid}/maps").read_text()
            except OSError:
                continue  # exited while we looked
            paths = {line[line.index(self.PREFIX):] for line in maps.splitlines() if self.PREFIX in line}
            if paths:
                self.seen |= paths
                self.found_in.add(pid)

    def remove_leftovers(self) -> None:
        for path in self.seen:
            Path(path).unlink(missing_ok=True)


def spawn(run_path: Path, cfg: Config, extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """The processes of the K tasks: one mpiexec, or K processes on the file exchange."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    if cfg.transfer.backend == "file":
        commands = [worker_command(run_path, t) for t in range(cfg.splits)]
    else:
        commands = [[find_mpiexec(), "-n", str(cfg.splits)] + worker_command(run_path)]
    # Own session: a terminal's Ctrl-C reaches only us, and we pass on the checkpoint signal instead.
    return [subprocess.Popen(c, env=env, start_new_session=True) for c in commands]


class EarlyStart:
    """The K tasks started before the run directory is written, waiting at a gate (hpc_mto.gate)
    while the launcher checks and writes it: their imports overlap the launcher's."""

    def __init__(self, run_path: Path, cfg: Config):
        self.gate, self.opened = Gate(), False
        try:
            self.procs = spawn(run_path, cfg, self.gate.environ())
        except BaseException:
            self.gate.remove()
            raise

    def open(self) -> list[subprocess.Popen]:
        self.gate.open()
        self.opened = True
        return self.procs

    def cancel(self) -> None:
        """Unless the gate opened: the launch failed before the tasks passed it, so they have read
        nothing, written nothing and not joined MPI; they are killed rather than waited for (they
        would finish importing torch first)."""
        if self.opened:
            return
        self.gate.close()
        doomed = worker_pids([p.pid for p in self.procs])
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # mpiexec and its proxies: their own process group
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()
        self.gate.remove()


def start(run: RunDir, show_progress: bool | None = None, early: EarlyStart | None = None) -> int:
    """Run (or continue) the run to its end; returns the exit status (signals.EXIT_REQUEUE: stopped).
    ``early``: the tasks were started already and wait at their gate for the run directory."""
    cfg = run.config()
    k = cfg.splits
    stop_signal = parse_signal(cfg.checkpoint.signals[0]) if cfg.checkpoint.signals else signal.SIGTERM
    procs = early.open() if early is not None else spawn(run.path, cfg)

    def forward(signum, frame):
        # To the workers only: mpiexec itself dies of USR2 instead of forwarding it.
        for pid in worker_pids([p.pid for p in procs]):
            try:
                os.kill(pid, stop_signal)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    progress = Progress(run, k, show_progress)
    segments = MpichSegments(k if cfg.transfer.backend == "mpi" else 0)  # the file exchange runs no MPI
    try:
        while any(p.poll() is None for p in procs):
            progress.draw()
            segments.look([p.pid for p in procs])
            time.sleep(0.2)
        progress.draw(force=True)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if early is not None:
            early.gate.remove()
    segments.remove_leftovers()
    codes = [p.returncode for p in procs]
    return next((c for c in codes if c != 0), 0)
