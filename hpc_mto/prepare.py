"""Creating a run directory, once, in the launcher: the data and the network are checked against
each other, the K splits drawn, and config.yaml and splits.h5 written, before any task starts."""

from __future__ import annotations

import fnmatch

from . import data, live, models, provenance, splits
from .blocks import select_names
from .config import Config
from .errors import ConfigError
from .rundir import RunDir


def prepare(run: RunDir, cfg: Config) -> None:
    ds = data.load(cfg.data)  # before anything is written: a data error leaves no half-made run
    s = splits.make(ds.y, cfg.splits, cfg.data.val_fraction, cfg.data.selection_holdout, cfg.seed,
                    cfg.data.stratify, ds.test_index, ds.test_source)
    net = models.build(cfg.model, ds.input_shape, ds.num_classes)  # shape errors before any job starts
    check_blocks(cfg.transfer.blocks, net.state_dict())
    tracking = live.tracking_runs(cfg, run.path, run.mlflow_ids)  # a missing package stops us here
    run.create(cfg)
    live.write_ids(run.mlflow_ids, tracking)
    run.code.write({"model.factory": models.user_code(cfg.model), "data.factory": cfg.data.factory})
    provenance.write_launch(run.provenance_file)
    run.write_config(cfg, *provenance.summary_lines(run.provenance_file, run.code.factories()))
    splits.write(run.splits_file, s, {"data_fingerprint": data.fingerprint(ds), "seed": cfg.seed,
                                      "num_classes": ds.num_classes, "input_shape": list(ds.input_shape)})


def check_blocks(patterns: list[str], state: dict) -> None:
    """A transfer.blocks pattern that selects nothing is a typo, not a wish to transfer nothing."""
    travelling = select_names(state, ["*"])
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in travelling):
            shown = ", ".join(travelling[:12]) + (", ..." if len(travelling) > 12 else "")
            raise ConfigError(f"invalid config: transfer.blocks pattern {pattern!r} matches no floating-point "
                              f"state entry of this network; entries: {shown}")
