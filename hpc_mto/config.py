"""Typed run configuration: one source of truth for every setting, its default and its rule.

A config is a tree of dataclasses. YAML files and ``--set key=value`` overrides are merged onto the
defaults; unknown keys fail and list the valid ones; every rule is checked in ``validate`` with a
message that states it. The resolved config is written to ``RUN_DIR/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, get_type_hints

import yaml

from .errors import ConfigError
from .registry import DATASETS, MODELS


def _opt(default, help: str, choices: tuple | Callable[[], tuple] | None = None):
    """A config field with its documentation (and allowed values) kept beside the default.

    ``choices`` may be a function returning them: the dataset and model names come from their
    registries, the one place that lists them.
    """
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: str = _opt("digits", "dataset", DATASETS.names)
    factory: str | None = _opt(None, 'your own data: "package.module:function" returning a map-style train '
                                     "Dataset, or (train, test), with labels in .targets; replaces name")
    kwargs: dict = _opt({}, "keyword arguments of data.factory")
    data_root: str | None = _opt(None, "directory holding pre-staged torchvision datasets")
    path: str | None = _opt(None, "file for the npz/hdf5 datasets: arrays x, y (optionally x_test, y_test)")
    download: bool = _opt(False, "let torchvision download into data_root when files are missing")
    test_fraction: float = _opt(0.25, "test fraction carved off (seeded) when a dataset has no test split")
    val_fraction: float = _opt(0.2, "validation fraction of each of the K splits (0: every task trains on "
                                    "the whole pool; needs selection.rule=holdout)")
    selection_holdout: float = _opt(0.1, "fraction of the gross training set no task ever touches: one half "
                                         "chooses the output, the other estimates its accuracy (0 disables)")
    stratify: bool = _opt(True, "stratify splits and holdout by class")
    augment: str = _opt("none", "built-in image datasets: standard = random crop (+ horizontal flip for CIFAR), "
                                "drawn per sample from (seed, task, epoch, sample)", ("none", "standard"))


@dataclass
class ModelConfig:
    name: str = _opt("mlp", "network: a built-in, or a name an installed package registers", MODELS.names)
    factory: str | None = _opt(None, 'your own network: "package.module:function" taking (input_shape, '
                                     "num_classes, **model.kwargs) and returning a torch.nn.Module; replaces name")
    kwargs: dict = _opt({}, "keyword arguments of model.factory (or of a registered name)")
    width: int = _opt(128, "hidden units (mlp) or channels (cnn1d)")
    depth: int = _opt(2, "hidden layers (mlp)")
    shared_init: bool = _opt(False, "every task starts from the same initial weights (seed only)")


@dataclass
class TrainConfig:
    epochs: int = _opt(30, "epochs per task")
    batch_size: int = _opt(32, "mini-batch size")
    optimizer: str = _opt("adam", "optimizer", ("adam", "sgd"))
    lr: float = _opt(1e-3, "learning rate")
    momentum: float = _opt(0.9, "sgd momentum")
    weight_decay: float = _opt(0.0, "weight decay")
    schedule: str = _opt("constant", "learning-rate schedule", ("constant", "cosine"))
    lr_scale: list = _opt([], "per-task learning-rate multipliers, one per split (empty: all 1)")
    threads: int = _opt(1, "torch CPU threads per task (part of the exact-resume contract)")
    device: str = _opt("auto", "device: cuda by local rank when available", ("auto", "cpu", "cuda"))
    eval_batch_size: int = _opt(1024, "batch size for evaluation")
    num_workers: int = _opt(0, "DataLoader worker processes per task for a data.factory dataset (the bits do not "
                               "depend on it)")
    swa_epochs: int = _opt(0, "average each task's weights over its last N epochs (SWA; 0: off)")


@dataclass
class TransferConfig:
    policy: str = _opt("distill", "knowledge transfer policy", ("none", "best", "interpolate", "average", "distill"))
    interval: int = _opt(5, "epochs between transfer rounds")
    start: int = _opt(0, "first epoch after which a transfer round may run")
    blocks: list = _opt(["*"], "glob patterns of state_dict entries that travel")
    fitness: str = _opt("unseen", "samples a task judges a candidate on: 'unseen' by either model's "
                                  "lineage, its own validation set, or a training probe", ("unseen", "val", "train"))
    min_samples: int = _opt(100, "fitness 'unseen': a comparison on fewer samples is not made")
    probe_size: int = _opt(512, "size of the fixed training probe when fitness is 'train'")
    candidates: int | None = _opt(None, "best, interpolate, distill: peers each task scores per round, drawn "
                                        "from (seed, round, task); a round's cost per task then stays flat "
                                        "in K (unset: every peer)")
    min_gain: float = _opt(0.0, "a candidate is adopted when its fitness loss is lower by more than this")
    adopt_quantile: float = _opt(1.0, "only this fraction of the tasks, the worst by their own fitness, may "
                                      "adopt in a round (PBT's truncation; 1: all)")
    keep_lineages: float = _opt(0.5, "a round's adoptions never leave fewer distinct lineages than this "
                                     "fraction of the tasks (the largest gains go first; 0: no limit)")
    adopt_lr_factor: float = _opt(1.0, "a task's learning rate is multiplied by this each time it adopts")
    alpha: float = _opt(0.5, "interpolate: fraction of the way towards the adopted candidate")
    optimizer_state: str = _opt("reset", "optimizer state of adopted blocks", ("copy", "reset", "keep"))
    average_rate: float = _opt(1.0, "average: w <- (1 - rate) * w + rate * mean of the tasks (1: replace)")
    average_steps: int = _opt(0, "average: every N training steps (gradual, PAPA-style; 0: at each round)")
    distill_alpha: float = _opt(0.5, "distill: weight of the peers' soft targets in the loss")
    distill_temperature: float = _opt(4.0, "distill: softmax temperature of the soft targets")
    backend: str = _opt("mpi", "exchange: one MPI world, or HDF5 files on a shared file system",
                        ("mpi", "file"))
    peer_timeout: float = _opt(600.0, "file backend: seconds to wait for a peer before using its "
                                      "newest checkpointed blocks")
    heartbeat_timeout: float = _opt(120.0, "MPI backend: a task whose peer shows no sign of life for this many "
                                           "seconds ends the job, naming the peer (0: off)")


@dataclass
class SelectionConfig:
    rule: str = _opt("cv_mean", "which score picks the single model: the CV-matrix row mean (the paper's "
                                "rule) or the holdout's selection half", ("cv_mean", "holdout"))
    output: str = _opt("auto", "what the run outputs: 'auto' picks by the holdout's selection half",
                       ("auto", "single", "ensemble", "soup", "student"))
    member: str = _opt("auto", "each task's snapshot in the ensemble and the soup (auto: swa when on, else "
                               "best, or final without validation)", ("auto", "best", "final", "swa"))
    distill_output: bool = _opt(False, "after training, distil the K-model ensemble into one student on the pool")
    student_alpha: float = _opt(1.0, "student: weight of the ensemble's soft targets in its loss")
    student_temperature: float = _opt(4.0, "student: softmax temperature of the soft targets")
    hide_test: bool = _opt(False, "keep test scores out of what hpc-mto prints (summary, status, report) until "
                                  "hpc-mto report --show-test; result.json still holds them")


@dataclass
class CheckpointConfig:
    every: float = _opt(60.0, "seconds: checkpoint at the first epoch end this long after the previous one (and "
                              "at the end, on a stop signal, at file-exchange rounds); 0: every epoch end")
    keep: int = _opt(2, "complete checkpoints kept per task")
    signals: list = _opt(["USR2", "TERM"], "signals that make every task checkpoint and stop")


@dataclass
class LogConfig:
    tensorboard: bool = _opt(False, "each task writes its epoch metrics live to RUN_DIR/tensorboard/task-<t>/ "
                                    "(needs tensorboard)")
    mlflow: str | None = _opt(None, "MLflow tracking URI (e.g. sqlite:////shared/mlflow.db or a server): each "
                                    "task logs its epoch metrics live to its own MLflow run (needs hpc-mto[mlflow])")
    mlflow_experiment: str = _opt("hpc-mto", "MLflow experiment the K task runs belong to")


@dataclass
class Config:
    seed: int = _opt(0, "seed of splits, initialisation and data order")
    splits: int = _opt(4, "K: train/validation splits, one task each")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        _check_choices(self)
        rules = [
            (self.splits >= 1, "splits must be >= 1"),
            (0 <= self.data.val_fraction < 1, "data.val_fraction must be in [0, 1)"),
            (0 < self.data.test_fraction < 1, "data.test_fraction must be in (0, 1)"),
            (0 <= self.data.selection_holdout < 1, "data.selection_holdout must be in [0, 1)"),
            (self.model.width >= 1 and self.model.depth >= 1, "model.width and model.depth must be >= 1"),
            (self.train.epochs >= 1, "train.epochs must be >= 1"),
            (self.train.batch_size >= 1 and self.train.eval_batch_size >= 1,
             "train.batch_size and train.eval_batch_size must be >= 1"),
            (self.train.lr > 0, "train.lr must be > 0"),
            (0 <= self.train.momentum < 1, "train.momentum must be in [0, 1)"),
            (self.train.weight_decay >= 0, "train.weight_decay must be >= 0"),
            (self.train.threads >= 1, "train.threads must be >= 1"),
            (self.train.num_workers >= 0, "train.num_workers must be >= 0"),
            (len(self.train.lr_scale) in (0, self.splits), "train.lr_scale must be empty or hold one "
                                                             "multiplier per split"),
            (all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in self.train.lr_scale),
             "train.lr_scale entries must be numbers > 0"),
            (self.train.swa_epochs >= 0, "train.swa_epochs must be >= 0"),
            (self.transfer.interval >= 1, "transfer.interval must be >= 1 (epochs)"),
            (self.transfer.start >= 0, "transfer.start must be >= 0 (epochs)"),
            (self.transfer.min_samples >= 1, "transfer.min_samples must be >= 1"),
            (self.transfer.candidates is None or 1 <= self.transfer.candidates <= self.splits - 1,
             f"transfer.candidates must be between 1 and splits - 1 = {self.splits - 1} (peers scored per "
             "round), or unset for every peer"),
            (0 < self.transfer.adopt_quantile <= 1, "transfer.adopt_quantile must be in (0, 1]"),
            (self.transfer.adopt_lr_factor > 0, "transfer.adopt_lr_factor must be > 0"),
            (0 <= self.transfer.keep_lineages <= 1, "transfer.keep_lineages must be in [0, 1]"),
            (0 < self.transfer.average_rate <= 1, "transfer.average_rate must be in (0, 1]"),
            (self.transfer.average_steps >= 0, "transfer.average_steps must be >= 0"),
            (0 <= self.transfer.distill_alpha <= 1, "transfer.distill_alpha must be in [0, 1]"),
            (self.transfer.distill_temperature > 0, "transfer.distill_temperature must be > 0"),
            (0 <= self.selection.student_alpha <= 1, "selection.student_alpha must be in [0, 1]"),
            (self.selection.student_temperature > 0, "selection.student_temperature must be > 0"),
            (self.transfer.probe_size >= 1, "transfer.probe_size must be >= 1"),
            (0 < self.transfer.alpha <= 1, "transfer.alpha must be in (0, 1]"),
            (self.transfer.min_gain >= 0, "transfer.min_gain must be >= 0"),
            (self.transfer.peer_timeout > 0, "transfer.peer_timeout must be > 0 seconds"),
            (self.transfer.heartbeat_timeout >= 0, "transfer.heartbeat_timeout must be >= 0 seconds"),
            (len(self.transfer.blocks) > 0 and all(isinstance(b, str) for b in self.transfer.blocks),
             "transfer.blocks must be a non-empty list of glob patterns"),
            (self.checkpoint.keep >= 1, "checkpoint.keep must be >= 1"),
            (self.checkpoint.every >= 0, "checkpoint.every must be >= 0 seconds"),
        ]
        for ok, rule in rules + self._combination_rules():
            if not ok:
                raise ConfigError(f"invalid config: {rule}")
        from .factories import check_spec

        for section in ("model", "data"):
            if getattr(self, section).factory is not None:
                check_spec(f"{section}.factory", getattr(self, section).factory)
            if not all(isinstance(k, str) for k in getattr(self, section).kwargs):
                raise ConfigError(f"invalid config: {section}.kwargs must map argument names to values")
        from .signals import parse_signal  # late import: signals imports nothing from config

        for name in self.checkpoint.signals:
            parse_signal(name)
        return self


    def _combination_rules(self) -> list[tuple[bool, str]]:
        """Rules between keys: what a setting needs from the others."""
        no_val = self.data.val_fraction == 0
        judged = self.transfer.policy in ("best", "interpolate")
        halves = self.data.selection_holdout > 0
        return [
            (not (no_val and self.selection.rule == "cv_mean"),
             "data.val_fraction=0 leaves no validation set for the CV matrix: set selection.rule=holdout"),
            (not (no_val and judged and self.transfer.fitness != "train"),
             f"data.val_fraction=0 leaves no validation set to judge transfers on: transfer.policy="
             f"{self.transfer.policy} needs transfer.fitness=train"),
            (not (no_val and self.selection.member == "best"),
             "data.val_fraction=0 leaves no best-validation snapshot: selection.member must not be best"),
            (not (self.selection.member == "swa" and self.train.swa_epochs == 0),
             "selection.member=swa needs train.swa_epochs >= 1"),
            (self.train.swa_epochs <= self.train.epochs, "train.swa_epochs must be <= train.epochs"),
            (halves or (self.selection.rule != "holdout" and self.selection.output in ("auto", "single", "ensemble")
                        and not self.selection.distill_output),
             "data.selection_holdout=0 leaves nothing to choose on: selection.rule=holdout, selection.output "
             "soup/student and selection.distill_output need a holdout"),
            (not (self.selection.output == "soup" and not self.model.shared_init),
             "selection.output=soup needs model.shared_init=true (weights of unrelated networks do not average)"),
            (self.transfer.candidates is None or self.transfer.policy in ("best", "interpolate", "distill"),
             f"transfer.candidates applies to policies best, interpolate and distill, not "
             f"{self.transfer.policy} (average sums every task's blocks)"),
            (not (self.selection.output == "student" and not self.selection.distill_output),
             "selection.output=student needs selection.distill_output=true"),
        ]


def _sections(obj) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(obj)}


def choices(f: dataclasses.Field) -> tuple | None:
    """The allowed values of a config field, or None when any value of its type goes."""
    found = f.metadata.get("choices")
    return found() if callable(found) else found


def _check_choices(obj, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif choices(f) is not None and value not in choices(f):
            valid = ", ".join(map(str, choices(f)))
            raise ConfigError(f"invalid config: {prefix}{f.name}={value!r}; valid: {valid}")


def valid_keys(obj=None, prefix: str = "") -> list[str]:
    """Every settable dotted key, e.g. ``transfer.policy``."""
    obj = obj if obj is not None else Config()
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += valid_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _coerce(key: str, value: Any, hint: Any, default: Any) -> Any:
    """Check one leaf value against its declared type; ints are accepted where floats are."""
    expected = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}
    hint_s = str(hint)
    if value is None and "None" in hint_s:
        return None
    for name, typ in expected.items():
        if hint_s.startswith(name) or hint_s == f"<class '{name}'>":
            if typ is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            if typ is not bool and isinstance(value, bool):
                break
            if isinstance(value, typ):
                return value
            raise ConfigError(f"invalid config: {key} must be {name}, got {value!r}")
    raise ConfigError(f"invalid config: {key} has an unexpected value {value!r} (default {default!r})")


def _merge(obj, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config: {prefix.rstrip('.') or 'top level'} must be a mapping")
    fields = _sections(obj)
    hints = get_type_hints(type(obj))
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in fields:
            valid = [k for k in valid_keys(obj, prefix)]
            close = difflib.get_close_matches(dotted, valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint}; valid keys: {', '.join(valid)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, dotted + ".")
        else:
            setattr(obj, key, _coerce(dotted, value, hints[key], current))


def _yaml11_floats(value):
    """YAML 1.1 reads "1e-3" as a string (it wants a dot); a number is what users mean."""
    if isinstance(value, list):
        return [_yaml11_floats(v) for v in value]
    if isinstance(value, str) and any(c in value for c in "eE") and any(c.isdigit() for c in value):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_override(text: str) -> dict:
    """``a.b=value`` -> ``{"a": {"b": value}}`` with the value parsed as YAML (so 1e-3, true, [a, b])."""
    if "=" not in text:
        raise ConfigError(f"invalid override {text!r}: expected key=value, e.g. transfer.policy=average")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    value = _yaml11_floats(value)
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        ctx, ctx_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        # The error often surfaces lines after its cause (an unclosed bracket): name where it began.
        if ctx and ctx_mark:
            problem += f" ({ctx} started at line {ctx_mark.line + 1})"
        raise ConfigError(f"config file {path}: YAML syntax error{where}: {problem}") from None
    return data or {}


def build(layers: list[dict]) -> Config:
    """Defaults, then each layer (file contents, overrides) in order; validated."""
    cfg = Config()
    for layer in layers:
        _merge(cfg, layer)
    return cfg.validate()


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    layers = [read_yaml(path)] if path else []
    layers += [parse_override(o) for o in overrides]
    return build(layers)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def from_dict(data: dict) -> Config:
    return build([data])


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# Keys that may differ between a run's config and the config it is resumed with: they change how
# long or how loudly a run goes on, not what the finished part of it computed.
RESUME_SAFE_KEYS = frozenset({"train.epochs", "transfer.peer_timeout", "transfer.heartbeat_timeout",
                              "checkpoint.every", "checkpoint.keep", "checkpoint.signals", "train.device",
                              "train.num_workers", "log.tensorboard", "log.mlflow", "log.mlflow_experiment",
                              "data.data_root", "data.download", "selection.hide_test"})


def resume_diff(old: Config, new: Config) -> list[str]:
    """Lines ``key: old -> new`` for every changed key that is not safe to change on resume."""
    a, b = flatten(old.to_dict()), flatten(new.to_dict())
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k] and k not in RESUME_SAFE_KEYS]


def help_table() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every key: the README's config table is generated from this."""
    rows = []

    def walk(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                text = f.metadata.get("help", "")
                if choices(f) is not None:
                    text += " (one of: " + ", ".join(map(str, choices(f))) + ")"
                rows.append((prefix + f.name, value, text))

    walk(Config())
    return rows
