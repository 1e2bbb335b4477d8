"""What both benchmarks share: the CLI they drive, the machine they describe, the results file.

The benchmarks print figures; they are not tests. Each writes raw JSON under ``bench/results/`` and
regenerates its own marked section of ``bench/RESULTS.md``; the prose around the sections is written
by hand.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
# The hpc-mto beside this interpreter: the venv's, whatever PATH says.
HPC_MTO = str(Path(sys.executable).parent / "hpc-mto")


def be_nice(level: int = 10) -> None:
    """Lower our priority (inherited by every run we start): the machine is shared."""
    current = os.nice(0)
    if current < level:
        os.nice(level - current)


def launch_command(run_dir: Path, config: str | None, overrides: list[str]) -> list[str]:
    cmd = [HPC_MTO, "launch", "--run-dir", str(run_dir), "--no-progress"]
    if config:
        cmd += ["--config", str(ROOT / config)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def shell_line(cmd: list[str]) -> str:
    """The command as a reader would type it from the repository root."""
    short = [".venv/bin/hpc-mto" if c == HPC_MTO else c.replace(f"{ROOT}/", "") for c in cmd]
    return " ".join(short)


def run_cli(cmd: list[str], env: dict | None = None, ok=(0,)) -> subprocess.CompletedProcess:
    """Run a command to its end; a failure stops the benchmark with the command's last lines."""
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode not in ok:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise SystemExit(f"benchmark: {shell_line(cmd)} exited with {proc.returncode}:\n{tail}")
    return proc


def read_json(path: Path, default=None):
    return json.loads(Path(path).read_text()) if Path(path).exists() else default


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def machine() -> dict:
    """What the figures were measured on (timings mean little without it)."""
    import numpy
    import torch
    from mpi4py import MPI

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")))
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "mpi": MPI.Get_library_version().splitlines()[0].strip(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_at_start": os.getloadavg(), "niceness": os.nice(0),
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def machine_line(m: dict) -> str:
    gpu = m["cuda"] or "no GPU"
    return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {gpu}; Linux {m['kernel']}, "
            f"Python {m['python']}, torch {m['torch']}, {m['mpi']}; load average at start "
            f"{m['load_average_at_start'][0]:.1f} (other work shared the machine), niceness {m['niceness']}; "
            f"{m['date']}")


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def update_results(section: str, markdown: str) -> None:
    """Replace the generated block ``section`` of RESULTS.md, keeping the hand-written text around it."""
    begin, end = f"<!-- {section}:begin (generated) -->", f"<!-- {section}:end -->"
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmarks\n"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS_MD.write_text(text)
