"""Where a run's result came from: versions, hosts, the command and the times (result.json's
``provenance``). The launcher writes its part to RUN_DIR/provenance.json when it creates the run, and
a summary of it as comment lines at the top of config.yaml; task 0 adds the rest when it writes the
result."""

from __future__ import annotations

import json
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import __version__
from .atomic import write_text


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def versions() -> dict:
    import numpy
    import torch

    return {"hpc_mto": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__}


def write_launch(path: Path) -> None:
    """The launcher's part: the command line, where and when, and the versions it ran with."""
    write_text(path, json.dumps({"command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                                 "launched": now(), "launcher_host": socket.gethostname(), **versions()},
                                indent=1) + "\n")


def summary_lines(launch_file: Path, code: dict) -> list[str]:
    """The launch record and the user's code in a few lines (config.yaml's header)."""
    p = json.loads(launch_file.read_text())
    lines = [f"hpc-mto {p['hpc_mto']} (python {p['python']}, torch {p['torch']}, numpy {p['numpy']})",
             f"launched {p['launched']} on {p['launcher_host']}: {p['command']}"]
    for key, src in sorted(code.items()):
        lines.append(f"{key}: {src['module']} {src['version'] or '(no version)'}, sha256 {str(src['sha256'])[:16]}"
                     + (f", git {src['git_commit']}" if src.get("git_commit") else ""))
    return lines


def git_commit(file: Path) -> str | None:
    """The commit of the repository holding ``file`` ("+dirty" when the file differs from it), if any."""
    try:
        run = lambda *args: subprocess.run(["git", "-C", str(file.parent), *args], capture_output=True, text=True,
                                           timeout=10)
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("diff", "--quiet", "HEAD", "--", file.name).returncode != 0
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):  # no git on this node
        return None


def finished(launch_file: Path, hosts: list[str], code: dict) -> dict:
    """The whole record, as task 0 writes it into result.json."""
    launch = json.loads(launch_file.read_text()) if launch_file.is_file() else {}
    mpi = None
    if "mpi4py.MPI" in sys.modules:
        mpi = sys.modules["mpi4py.MPI"].Get_library_version().splitlines()[0].strip()
    return {**launch, "tasks": versions(), "mpi": mpi, "hosts": sorted(set(hosts)), "finished": now(),
            "user_code": code}
