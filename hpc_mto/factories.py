"""User code named in a config: ``"package.module:function"`` (``model.factory``).

A config that names a factory imports and runs that code, in the launcher and in every rank; the
promise that nothing read from a run directory executes code covers data and checkpoints, not this.
Ranks are fresh interpreters, so the module must be importable there the same way: installed in the
venv, or on ``PYTHONPATH`` (which local and SLURM launches pass on).

The run keeps a copy of the factory's source file (``RUN_DIR/code/``) and its SHA-256, so that a
resume or a requeue with different code is refused with the diff instead of silently continuing
checkpoints with another network (``hpc-mto resume --allow-code-change`` accepts the new code).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.metadata
import json
import re
import sys
from pathlib import Path
from typing import Callable

from .atomic import write_text
from .errors import ConfigError

SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
FORMAT = '"package.module:function", importable on every node (installed, or on PYTHONPATH)'


def check_spec(key: str, spec: str) -> None:
    if not SPEC.fullmatch(spec):
        raise ConfigError(f"invalid config: {key}={spec!r}; expected {FORMAT}")


def resolve(key: str, spec: str) -> Callable:
    """The function a spec names, or one line saying why it can't be had."""
    check_spec(key, spec)
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way while importing
        raise ConfigError(f"invalid config: {key}={spec!r}: cannot import {module_name} "
                          f"({type(exc).__name__}: {exc}); it must be importable on every node "
                          "(installed, or on PYTHONPATH)") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"invalid config: {key}={spec!r}: module {module_name} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"invalid config: {key}={spec!r} is a {type(fn).__name__}, not a function")
    return fn


def source(spec: str, git: bool = True) -> dict:
    """What identifies the factory's code: module, file, SHA-256 of the file, package version, and
    (with ``git``) the commit of the repository holding it."""
    module_name = spec.partition(":")[0]
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    file = Path(getattr(module, "__file__", "") or "")
    top = module_name.split(".")[0]
    version = getattr(module, "__version__", None) or getattr(sys.modules.get(top), "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(module_name.split(".")[0])
        except importlib.metadata.PackageNotFoundError:
            version = None
    digest = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None
    from .provenance import git_commit

    return {"spec": spec, "module": module_name, "file": str(file), "sha256": digest, "version": version,
            "git_commit": git_commit(file) if digest and git else None}


class CodeRecord:
    """RUN_DIR/code/: code.json (``source`` of each factory by config key) and a copy of each file."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.index = directory / "code.json"

    def factories(self) -> dict[str, dict]:
        return json.loads(self.index.read_text()) if self.index.is_file() else {}

    def write(self, specs: dict[str, str]) -> None:
        """Record the code each config key (e.g. model.factory) names, as it is now."""
        found = {key: source(spec) for key, spec in specs.items() if spec}
        if not found:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for key, src in found.items():
            if src["sha256"]:
                write_text(self.dir / self._copy_name(key), Path(src["file"]).read_text(errors="replace"))
        write_text(self.index, json.dumps(found, indent=1) + "\n")

    def check_unchanged(self, allow_change: bool = False) -> list[str]:
        """Raise with the diff if a recorded factory's code changed; with ``allow_change`` record the new
        code instead and return the keys whose code changed."""
        recorded = self.factories()
        # Every rank checks at start: the hash only, no git process on the compute nodes.
        changed = {key: src for key, src in recorded.items()
                   if source(src["spec"], git=False)["sha256"] != src["sha256"]}
        if not changed:
            return []
        if allow_change:
            self.write({key: src["spec"] for key, src in recorded.items()})
            return sorted(changed)
        key, src = next(iter(sorted(changed.items())))
        now = source(src["spec"], git=False)
        old = self.dir / self._copy_name(key)
        diff = "".join(difflib.unified_diff(
            old.read_text(errors="replace").splitlines(True) if old.is_file() else [],
            Path(now["file"]).read_text(errors="replace").splitlines(True) if Path(now["file"]).is_file() else [],
            f"{src['file']} (when the run started)", f"{now['file']} (now)"))
        raise ConfigError(f"the code of {key} ({src['module']}) changed since the run started (sha256 "
                          f"{str(src['sha256'])[:12]} -> {str(now['sha256'])[:12]}); resume with "
                          f"--allow-code-change to continue with the new code\n{diff}".rstrip())

    @staticmethod
    def _copy_name(key: str) -> str:
        return key.replace(".", "-") + ".py"


@functools.cache
def entry_points(group: str) -> dict[str, str]:
    """Names that installed packages register for hpc-mto (``[project.entry-points."hpc_mto.models"]``)."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=group)}
