"""The ``hpc-mto`` command line: it parses and dispatches; the work lives in the modules."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import click

from . import config as config_mod
from .errors import UserError
from .rundir import RunDir
from .signals import EXIT_REQUEUE


def user_errors(fn):
    """A UserError becomes one line on stderr and exit status 2: no traceback for bad input."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            click.echo(f"hpc-mto: error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpc-mto")
def main():
    """Train K copies of a network on K random train/validation splits with knowledge transfer
    between them (Zhang et al., IJCNN 2020), and output the model with the best cross-validation."""


def summary_line(run: RunDir) -> str:
    r = json.loads(run.result_file.read_text())
    sel, ens = r["selected"], r["ensemble"]
    hold = f", holdout {sel['holdout_acc']:.4f}" if sel.get("holdout_acc") is not None else ""
    ens_s = f"; ensemble test acc {ens['test_acc']:.4f}" if ens.get("test_acc") is not None else ""
    return (f"selected {sel['id']} by {r['rule']}: test acc {sel['test_acc']:.4f} "
            f"(cv mean {sel['cv_mean_acc']:.4f}{hold}){ens_s}; run dir {run.path}")


def finish_local(run: RunDir, code: int) -> None:
    if code == 0 and run.finished:
        click.echo(summary_line(run))
        return
    if code == EXIT_REQUEUE:
        click.echo(f"hpc-mto: run stopped with a checkpoint; continue it with: hpc-mto resume {run.path}", err=True)
    else:
        click.echo(f"hpc-mto: error: the run failed (exit status {code}); see the messages above. "
                   f"Checkpoints are kept: hpc-mto resume {run.path}", err=True)
    sys.exit(code or 1)


def default_run_dir(cfg: config_mod.Config) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.data.name}-k{cfg.splits}-{cfg.transfer.policy}"


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--splits", type=int, help="K: number of splits (shorthand for --set splits=K).")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Run directory (default: runs/<time>-<name>).")
@click.option("--executor", type=click.Choice(["local"]), default="local", show_default=True,
              help="Where the tasks run.")
@click.option("--progress/--no-progress", default=None, help="Live per-task progress (default: on a terminal).")
@user_errors
def launch(config_file, overrides, splits, run_dir, executor, progress):
    """Start a run: write the run directory, then train the K tasks."""
    from .launch import local
    from .worker import prepare

    overrides = list(overrides) + ([f"splits={splits}"] if splits is not None else [])
    cfg = config_mod.load(config_file, overrides)
    run = RunDir(run_dir or default_run_dir(cfg))
    prepare(run, cfg)
    click.echo(f"run directory: {run.path}")
    with run.lock():
        code = local.start(run, progress)
    finish_local(run, code)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change a key that is safe to change on resume (e.g. train.epochs).")
@click.option("--progress/--no-progress", default=None)
@user_errors
def resume(run_dir, overrides, progress):
    """Continue a stopped run from the newest checkpoint every task completed."""
    from .launch import local

    run = RunDir(run_dir).require()
    if run.finished and not overrides:
        click.echo(f"run {run.path} already finished")
        click.echo(summary_line(run))
        return
    with run.lock():
        apply_resume_overrides(run, overrides)
        code = local.start(run, progress)
    finish_local(run, code)


def apply_resume_overrides(run: RunDir, overrides) -> None:
    """Rewrite config.yaml with the overrides, refusing any key that would change finished work."""
    if not overrides:
        return
    from .atomic import write_text

    old = run.config()
    new = config_mod.build([old.to_dict()] + [config_mod.parse_override(o) for o in overrides])
    changed = config_mod.resume_diff(old, new)
    if changed:
        safe = ", ".join(sorted(config_mod.RESUME_SAFE_KEYS))
        raise UserError(f"cannot resume with a changed config: {'; '.join(changed)} (keys safe to change: {safe})")
    if run.finished:
        raise UserError(f"run {run.path} already finished; start a new run to train longer")
    write_text(run.config_file, config_mod.dump(new))


if __name__ == "__main__":
    main()
