"""Run the K tasks on this machine: ``mpiexec -n K`` (MPI backend) or K processes (file backend).

The launcher holds the run directory's lock for the whole run, shows live progress on a terminal,
and turns Ctrl-C / SIGTERM into the checkpoint signal so a local run stops resumably too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..errors import LaunchError
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
    launcher CPU beside the training it waits for)."""

    PREFIX = "/dev/shm/mpich"
    EVERY_S = 2.0

    def __init__(self, ranks: int):
        self.ranks = ranks
        self.seen: set[str] = set()
        self.found_in: set[int] = set()
        self._next = 0.0

    def look(self, roots: list[int]) -> None:
        if len(self.found_in) >= self.ranks or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.EVERY_S
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


def start(run: RunDir, show_progress: bool | None = None) -> int:
    """Run (or continue) the run to its end; returns the exit status (signals.EXIT_REQUEUE: stopped)."""
    cfg = run.config()
    k = cfg.splits
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cfg.transfer.backend == "file":
        commands = [worker_command(run.path, t) for t in range(k)]
    else:
        commands = [[find_mpiexec(), "-n", str(k)] + worker_command(run.path)]
    stop_signal = parse_signal(cfg.checkpoint.signals[0]) if cfg.checkpoint.signals else signal.SIGTERM
    # Own session: a terminal's Ctrl-C reaches only us, and we pass on the checkpoint signal instead.
    procs = [subprocess.Popen(c, env=env, start_new_session=True) for c in commands]

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
    segments.remove_leftovers()
    codes = [p.returncode for p in procs]
    return next((c for c in codes if c != 0), 0)
