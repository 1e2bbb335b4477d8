"""The records of a run directory: one typed definition, one writer and one reader for each.

    Result          result.json              written by task 0 at the end; its presence means "finished"
    MetricsLine     metrics/task-<t>.jsonl   one line per epoch per task
    TransferDecision transfers/task-<t>.jsonl one line per transfer round, this task being the target
    ModelInfo       model.json               how to rebuild the selected model
    JobsRecord      slurm/jobs.json          the SLURM request, submitit parameters and job ids

Every file (every line of a JSONL log) carries ``"schema": N``, the version of its record's layout.
A reader refuses any other version with one line naming the file and the versions, so a run
directory written by another hpc-mto release is never half-read into a KeyError. Change a record
here and bump its ``SCHEMA``: the other modules read and write records only through these classes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from . import __version__
from .atomic import write_json
from .errors import RunDirError

R = TypeVar("R", bound="Record")


def finite_or_none(x) -> float | None:
    """JSON has no inf/NaN: a non-finite score is written as null so every reader parses it."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class Record:
    """Base of the records: JSON form with the schema version, and the checked way back."""

    SCHEMA: ClassVar[int]

    def to_json(self) -> dict:
        return {"schema": self.SCHEMA, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls: type[R], data: dict, source: Path | str) -> R:
        if not isinstance(data, dict):
            raise RunDirError(f"{source}: not an hpc-mto {cls.__name__} record")
        version = data.get("schema")
        if version != cls.SCHEMA:
            written = f"schema {version}" if version is not None else "no schema version (hpc-mto 0.1.x)"
            raise RunDirError(f"{source} was written with {written}; this hpc-mto {__version__} reads "
                              f"{cls.__name__} schema {cls.SCHEMA}: open it with the hpc-mto release that wrote it")
        try:
            return _build(cls, {k: v for k, v in data.items() if k != "schema"})
        except (TypeError, KeyError, ValueError) as exc:
            raise RunDirError(f"{source}: malformed {cls.__name__} record ({exc})") from None

    # -- whole-file records ----------------------------------------------------------------
    def write(self, path: Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def read(cls: type[R], path: Path) -> R:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{path} is not valid JSON ({exc})") from None
        except OSError as exc:
            raise RunDirError(f"cannot read {path}: {exc.strerror or exc}") from None
        return cls.from_json(data, path)


def _build(cls, data: dict):
    """A dataclass from its ``asdict`` form, rebuilding nested records by their type hints."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise KeyError(f"missing field {f.name!r}")
    return cls(**kwargs)


def _convert(hint, value):
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value)
    if origin is list and args:
        return [_convert(args[0], v) for v in value]
    if origin is dict and len(args) == 2:
        return {k: _convert(args[1], v) for k, v in value.items()}
    return value


# -- per-epoch and per-round logs ------------------------------------------------------------------
@dataclass
class MetricsLine(Record):
    """One epoch of one task: what it trained on, how it scored on its own validation set."""

    SCHEMA: ClassVar[int] = 1
    epoch: int  # 0-based index of the epoch this line closes
    train_loss: float  # cross-entropy on the training samples (without a distillation term)
    train_acc: float
    val_loss: float | None  # None: the task has no validation set (data.val_fraction=0)
    val_acc: float | None
    lr: float
    adopted_total: int = 0  # transfers this task has accepted so far
    lineage: list[int] = field(default_factory=list)  # tasks its weights descend from
    times: dict[str, float] = field(default_factory=dict)  # seconds so far: train, transfer, eval, checkpoint
    adopted: bool | None = None  # at a transfer round: whether this task accepted one

    @property
    def epochs_done(self) -> int:
        return self.epoch + 1


@dataclass
class StalePeer:
    """A late peer (file exchange) replaced by its checkpoint: how many rounds behind (None: no checkpoint)."""

    task: int
    rounds_behind: int | None


@dataclass
class TransferDecision(Record):
    """One transfer round seen from its target task."""

    SCHEMA: ClassVar[int] = 1
    round: int
    epoch: int
    policy: str
    target: int
    accepted: bool
    lineage: list[int]  # the target's lineage after the round
    stale: list[StalePeer] = field(default_factory=list)
    # best / interpolate: the adopted source; every candidate's fitness loss and the target's own loss
    # on the same samples (null: not compared or not finite), how many samples each comparison had,
    # whether this task was allowed to adopt (transfer.adopt_quantile), the largest gain seen
    source: int | None = None
    own_score: float | None = None
    scores: list[float | None] | None = None
    own_scores: list[float | None] | None = None
    samples: list[int] | None = None
    eligible: bool | None = None
    proposed: int | None = None  # the candidate that won the comparison, adopted or not
    veto: str | None = None  # why it was not adopted: adopt_quantile or keep_lineages
    gain: float | None = None
    # average: the tasks whose blocks were averaged; distill: the peers whose logits were used
    sources: list[int] | None = None
    # transfer.candidates: the peers this task scored in the round (null: every peer)
    peers: list[int] | None = None

    def adopted_from(self) -> list[int]:
        """The tasks whose blocks the target took in, itself excluded."""
        if not self.accepted:
            return []
        if self.sources is not None:
            return [s for s in self.sources if s != self.target]
        return [self.source]


class RecordLog(Generic[R]):
    """An append-only JSONL file of one record type. Its byte position is stored in checkpoints, so
    a resume can cut it back to exactly what the checkpointed state had written."""

    def __init__(self, path: Path, kind: type[R]):
        self.path, self.kind = Path(path), kind

    def append(self, record: R) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record.to_json()) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def position(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, position: int) -> None:
        if self.path.exists():
            os.truncate(self.path, position)

    def read(self) -> list[R]:
        """Every record; a half-written last line (a task killed mid-write) is skipped."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.append(self.kind.from_json(data, self.path))
        return out


# -- the end of a run ------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One network the selection scored: a task's final weights, best-validation snapshot or SWA."""

    id: str  # "task-<t>/<kind>"
    task: int
    kind: str  # final, best, swa
    finite: bool
    cv_mean_acc: float | None  # its CV-matrix row mean (None without validation sets): optimistic
    cv_mean_loss: float | None
    select_acc: float | None  # on the holdout's selection half (None without a holdout)
    estimate_acc: float | None  # on the holdout's estimation half
    estimate_loss: float | None
    test_acc: float
    test_loss: float | None
    test_ece: float | None
    lineage: list[int]


@dataclass
class Choice:
    """The candidate one selection rule picks."""

    index: int
    id: str
    cv_mean_acc: float | None
    select_acc: float | None
    estimate_acc: float | None
    test_acc: float


@dataclass
class Selected(Choice):
    """The single-network output: the choice of the run's rule (selection.rule)."""

    task: int
    kind: str


@dataclass
class OutputScores:
    """One kind of output (single, ensemble, soup, student), scored on the holdout halves and test."""

    id: str  # the single candidate's id, or the kind
    members: list[str]  # candidate ids it is made of (the ensemble's and the soup's members)
    select_acc: float | None
    estimate_acc: float | None
    estimate_loss: float | None
    test_acc: float | None
    test_loss: float | None
    test_ece: float | None  # expected calibration error, 15 equal-width confidence bins


@dataclass
class Timing:
    per_task: list[dict[str, float]]  # seconds per activity: train, transfer, eval, checkpoint
    total: dict[str, float]


@dataclass
class Result(Record):
    """result.json: every candidate's scores, the CV matrix, the outputs, the one chosen."""

    SCHEMA: ClassVar[int] = 1
    k: int
    candidates: list[Candidate]
    cv_acc: list[list[float]]  # [candidate][validation set]; empty without validation sets
    cv_loss: list[list[float | None]]
    rule: str
    choices: dict[str, Choice]  # selection rule -> the single candidate it picks
    selected: Selected  # the choice of the run's rule
    outputs: dict[str, OutputScores]  # every output built: single, ensemble, soup, student
    output: str  # the kind the run outputs (selection.output, or the best on the selection half)
    estimate: float | None  # the output's accuracy on the estimation half: the honest estimate
    estimate_samples: int
    lineages_left: int  # distinct lineages among the tasks' final weights
    disagreement: float | None  # mean pairwise test disagreement of the ensemble's members
    test_acc_mean: float  # mean over the tasks' final weights
    test_acc_best_single: float  # the best candidate by test accuracy: hindsight, for comparison only
    timing: Timing | None = None
    provenance: dict[str, Any] | None = None  # provenance.finished(): versions, hosts, command, times

    def summary_line(self, run_path: Path | str, hide_test: bool = False) -> str:
        out, sel = self.outputs[self.output], self.selected
        estimate = (f"estimated acc {self.estimate:.4f} (holdout estimation half, {self.estimate_samples} samples)"
                    if self.estimate is not None else "no holdout to estimate on")
        cv = f", cv mean {sel.cv_mean_acc:.4f} (optimistic)" if sel.cv_mean_acc is not None else ""
        test = ("", "", "; test scores hidden (selection.hide_test; hpc-mto report --show-test)") if hide_test else \
            (f", test acc {out.test_acc:.4f}", f": test acc {sel.test_acc:.4f}", "")
        return (f"output {self.output} ({out.id}): {estimate}{test[0]}; single model {sel.id} by {self.rule}"
                f"{test[1]}{cv}{test[2]}; run dir {run_path}")


@dataclass
class ModelInfo(Record):
    """model.json: what ``model.safetensors`` holds and how to rebuild the network around it."""

    SCHEMA: ClassVar[int] = 1
    model: dict[str, Any]  # the run's ModelConfig fields
    candidate: str  # what model.safetensors holds: a candidate id, "soup" or "student"
    input_shape: list[int]
    num_classes: int
    output: str = "single"  # the run's output kind; "ensemble": load the members, not model.safetensors
    ensemble: list[str] = field(default_factory=list)  # member files, relative to the run directory
    preprocessing: dict[str, Any] | None = None  # data.Dataset.preprocessing; None: written before 0.3


@dataclass
class JobSubmission:
    jobs: list[str]
    submitted: str  # local time, ISO format


@dataclass
class JobsRecord(Record):
    """slurm/jobs.json: what was asked of SLURM, so that status and resume ask for the same."""

    SCHEMA: ClassVar[int] = 1
    mode: str  # "gang" or "array"
    request: dict[str, Any]  # the launch options (launch.slurm_request.Request fields)
    parameters: dict[str, Any]  # the exact submitit SlurmExecutor parameters
    jobs: list[str] = field(default_factory=list)  # job ids of the latest submission
    history: list[JobSubmission] = field(default_factory=list)
