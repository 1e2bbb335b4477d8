"""The Python API: start a run and use what it trained, without the command line.

    import hpc_mto
    run = hpc_mto.launch({"splits": 4, "model": {"factory": "mypkg.nets:build"}}, run_dir="runs/a")
    run.result.output["estimate_acc"], run.predict(x_raw)

    run = hpc_mto.launch("configs/default.yaml", executor="slurm", partition="gpu", time=120)
    run.wait()

A local launch trains in child processes (mpiexec) and returns when the run has ended; a SLURM
launch returns once submitted. ``Run(run_dir)`` opens any run directory, finished or not.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import config as config_mod
from . import live
from .errors import ConfigError, RunDirError, UserError
from .records import Result
from .rundir import RunDir


class RunFailed(UserError):
    """The run ended without finishing; its checkpoints are kept (``Run.resume``)."""

    def __init__(self, message: str, run: "Run", exit_code: int = 1):
        super().__init__(message)
        self.run = run
        self.exit_code = exit_code


def launch(config: str | Path | dict | config_mod.Config | None = None, run_dir: str | Path | None = None,
           executor: str = "local", overrides: list[str] | tuple[str, ...] = (), progress: bool = False,
           **slurm_options) -> "Run":
    """Create a run directory and train (``executor="local"``) or submit it (``"slurm"``, with the
    ``hpc-mto launch`` SLURM options as keyword arguments, e.g. ``partition="gpu", time=120``).

    ``config``: a YAML path, a dict of sections (``{"transfer": {"policy": "best"}}``), a ``Config``,
    or None for the defaults; ``overrides`` are ``"key=value"`` strings applied on top.
    """
    p = plan(config, run_dir, executor, overrides, **slurm_options)
    if p.request is not None:
        from .launchers import slurm

        slurm.start(p.run, p.cfg, p.request)
        return Run(p.run.path)
    code = train_here(p, progress)  # before Run(): the run directory exists once this has begun
    return Run(p.run.path)._ended(code)


@dataclasses.dataclass
class Plan:
    """What a launch will do, decided before anything is written."""

    run: RunDir
    cfg: config_mod.Config
    request: object | None  # launchers.slurm_request.Request, or None for a local run


def plan(config, run_dir, executor: str, overrides, **slurm_options) -> Plan:
    """The config (``launch``'s ``config`` and ``overrides``, plus what the SLURM request implies), the
    run directory and the SLURM request; one clear error for an unknown executor or option."""
    from .launchers import slurm_request

    if executor not in ("local", "slurm"):
        raise ConfigError(f"executor={executor!r}; valid: local, slurm")
    if executor == "local" and slurm_options:
        raise ConfigError(f"{', '.join(sorted(slurm_options))}: only for executor='slurm'")
    extra: list[str] = []
    req = None
    if executor == "slurm":
        try:
            req = slurm_request.Request(**slurm_options)
        except TypeError as exc:
            valid = ", ".join(f.name for f in dataclasses.fields(slurm_request.Request))
            raise ConfigError(f"{exc}; valid SLURM options: {valid}") from None
        extra = slurm_request.config_overrides(req)
    cfg = _config(config, list(overrides) + extra)
    return Plan(RunDir(run_dir or RunDir.default_path(cfg)), cfg, req)


def train_here(p: Plan, progress: bool | None, say: Callable[[str], None] = lambda line: None) -> int:
    """A local plan: write the run directory and train the K tasks here; their exit status. ``say``
    hears where the run directory is once it exists."""
    from .launchers import local

    early = local.EarlyStart(p.run.path, p.cfg)  # the tasks import torch while we check and write
    try:
        from .prepare import prepare  # imports torch: after the tasks have started

        prepare(p.run, p.cfg)
        say(f"run directory: {p.run.path}")
        with p.run.lock():
            return local.start(p.run, progress, early)
    finally:
        early.cancel()  # a no-op once the gate opened; else (a failed check, a held lock) the tasks go


def _config(config, overrides: list[str]) -> config_mod.Config:
    layers: list[dict] = []
    if isinstance(config, config_mod.Config):
        layers.append(config.to_dict())
    elif isinstance(config, dict):
        layers.append(_named_factories(config))
    elif config is not None:
        layers.append(config_mod.read_yaml(config))
    return config_mod.build(layers + [config_mod.parse_override(o) for o in overrides])


def _named_factories(data: dict) -> dict:
    """A function given as ``model.factory`` becomes its "module:function" name. Ranks are fresh
    interpreters: they can only import a module-level function of an importable module."""
    factory = data.get("model", {}).get("factory") if isinstance(data.get("model"), dict) else None
    if factory is None or isinstance(factory, str):
        return data
    module, name = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not callable(factory) or module in (None, "__main__") or "<" in name or "." in name:
        what = "a lambda" if name.endswith("<lambda>") else "a closure" if "<locals>" in name else \
            "a function defined in __main__" if module == "__main__" else repr(factory)
        raise ConfigError(f"invalid config: model.factory must be a module-level function of an importable "
                          f"module (the ranks are fresh interpreters that import it by name); got {what}")
    return {**data, "model": {**data["model"], "factory": f"{module}:{name}"}}


@dataclasses.dataclass
class Restarted:
    jobs: list[str] | None  # SLURM: the resubmitted job ids
    exit_code: int | None  # local: how the tasks ended


def restart(run: RunDir, overrides, allow_code_change: bool, progress: bool | None,
            say: Callable[[str], None] = lambda line: None) -> Restarted:
    """Continue a run from its newest complete checkpoint: `hpc-mto resume` and ``Run.resume``.
    ``say`` hears of accepted code changes before the tasks start."""
    from .launchers import local, slurm

    record = run.jobs()
    with run.lock():
        if record is not None:
            slurm.refuse_if_live(run, record)  # before touching config.yaml under a running job
        run.update_config(list(overrides))
        live.write_ids(run.mlflow_ids, live.tracking_runs(run.config(), run.path, run.mlflow_ids))
        for key in run.code.check_unchanged(allow_code_change):
            say(f"continuing with the changed code of {key} (--allow-code-change)")
        if record is not None:
            return Restarted(slurm.submit(run, record), None)
        return Restarted(None, local.start(run, progress))


class Run:
    """A run directory: where it stands, its result and its trained networks."""

    def __init__(self, run_dir: str | Path):
        self.dir = RunDir(run_dir).require()
        self.path = self.dir.path

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def _ended(self, code: int) -> "Run":
        if code != 0 and not self.dir.finished:
            how = "stopped with a checkpoint" if code == 3 else f"failed (exit status {code})"
            raise RunFailed(f"run {self.path} {how}; continue it with Run({str(self.path)!r}).resume()", self, code)
        return self

    @property
    def config(self) -> config_mod.Config:
        return self.dir.config()

    def status(self) -> dict[str, Any]:
        """``state`` (finished, selection pending, running, pending or stopped), ``epochs_done`` (the
        slowest task's), ``epochs`` and, on SLURM, ``jobs`` (id -> SLURM state)."""
        from .launchers import slurm_queries

        cfg = self.config
        out: dict[str, Any] = {"epochs_done": min(self.dir.epochs_done(cfg.splits)), "epochs": cfg.train.epochs}
        record = self.dir.jobs()
        states = slurm_queries.job_states(record.jobs) if record is not None else {}
        if states:
            out["jobs"] = {jid: s.state for jid, s in states.items()}
        live = [s.state for s in states.values() if s.live]
        out["state"] = ("finished" if self.dir.finished else "selection pending" if self.dir.selection_pending()
                        else "running" if "RUNNING" in live else "pending" if live else "stopped")
        return out

    def wait(self, show_progress: bool = False) -> "Run":
        """Follow a SLURM run until its jobs end; raise ``RunFailed`` if they end without finishing it."""
        from .launchers import slurm

        record = self.dir.jobs()
        if record is not None and not self.dir.finished:
            states = slurm.follow(self.dir, record.jobs, show_progress)
            if not self.dir.finished:
                ended = ", ".join(f"{jid} {s.state}" for jid, s in states.items())
                raise RunFailed(f"the run's job ended without finishing it ({ended}); logs in {self.dir.slurm_dir}; "
                                f"continue it with Run({str(self.path)!r}).resume()", self)
        return self

    def resume(self, overrides: list[str] | tuple[str, ...] = (), allow_code_change: bool = False,
               progress: bool = False) -> "Run":
        """Continue the run from its newest complete checkpoint (SLURM: resubmit; call ``wait``)."""
        restarted = restart(self.dir, overrides, allow_code_change, progress)
        return self if restarted.jobs is not None else self._ended(restarted.exit_code)

    @property
    def result(self) -> Result:
        """The typed result record (``records.Result``) of a finished run."""
        if not self.dir.finished:
            raise RunDirError(f"run {self.path} has not finished: no result yet (status: {self.status()['state']})")
        return self.dir.result()

    def load_model(self):
        """The single selected network (``model.safetensors``), in eval mode on the CPU."""
        from .model_io import load_selected

        return load_selected(self.path)

    def load_ensemble(self):
        """The K-model ensemble: a module averaging its members' logits."""
        from .model_io import load_ensemble

        return load_ensemble(self.path)

    def predict(self, x, ensemble: bool | None = None, preprocessed: bool = False,
                batch_size: int = 1024) -> np.ndarray:
        """Class logits for samples ``x`` (array or tensor, shape (N, *input_shape)), as numpy.

        ``x`` holds raw samples as the dataset stores them (e.g. 0..255 pixels): the run's recorded
        preprocessing is applied first, unless ``preprocessed=True``. ``ensemble``: None uses the run's
        chosen output (``selection.output``), True the ensemble, False the single network.
        """
        import torch

        from .model_io import load_output

        net = load_output(self.path, ensemble)
        info = self.dir.model_record()
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        if tuple(x.shape[1:]) != tuple(info.input_shape):
            raise UserError(f"samples of shape {tuple(x.shape[1:])}; this network takes {tuple(info.input_shape)} "
                            f"(x must be (N, {', '.join(map(str, info.input_shape))}))")
        if not preprocessed:
            x = preprocess(x, info.preprocessing)
        with torch.no_grad():
            return torch.cat([net(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def preprocess(x, preprocessing: dict | None):
    """What the dataset loader did to its stored values (data.Dataset.preprocessing)."""
    if preprocessing is None:
        raise RunDirError("this run directory does not record its preprocessing (written by hpc-mto < 0.3): "
                          "pass samples preprocessed as in training, with preprocessed=True")
    import torch

    # The same float32 operations as the loader (data.py), so a raw sample gives the training bits.
    x = x / preprocessing["divide"]
    if preprocessing.get("mean") is not None:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, std = (torch.tensor(preprocessing[k], dtype=torch.float32).reshape(shape) for k in ("mean", "std"))
        x = (x - mean) / std
    return x


def read_samples(path: Path) -> np.ndarray:
    """Samples from a file: array ``x`` of an .npz (never unpickled) or HDF5 file, or a tensor in a .pt
    file (loaded with weights_only)."""
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    if path.suffix == ".pt":
        import torch

        try:
            x = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses pickled code: report, never run it
            raise UserError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
        if not isinstance(x, torch.Tensor):
            raise UserError(f"{path} holds a {type(x).__name__}; it must hold one tensor of samples")
        return x.numpy()
    kind = {".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5"}.get(path.suffix)
    if kind is None:
        raise UserError(f"{path}: unknown kind of file; valid: .npz or .h5 (array x), .pt (a tensor)")
    from .data import read_arrays

    arrays = read_arrays(path, kind)
    if "x" not in arrays:
        raise UserError(f"{path} has no array x (found: {', '.join(arrays) or 'none'})")
    return arrays["x"]
