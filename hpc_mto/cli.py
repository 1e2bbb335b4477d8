"""The ``hpc-mto`` command line: it parses and dispatches; the work lives in the modules."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import sys
from pathlib import Path

import click

from . import config as config_mod
from . import log
from .errors import LaunchError, UserError
from .launchers import slurm, slurm_queries, slurm_request
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
@click.option("--log-level", type=click.Choice(log.LEVELS), default=None,
              help=f"How much the launcher and the tasks log (default info; env {log.ENV}).")
def main(log_level):
    """Train K copies of a network on K random train/validation splits with knowledge transfer
    between them (Zhang et al., IJCNN 2020), and output the model with the best cross-validation."""
    if log_level:
        os.environ[log.ENV] = log_level  # the task processes (mpiexec, SLURM jobs) inherit it
    log.setup()


def summary_line(run: RunDir) -> str:
    return run.result().summary_line(run.path, hide_test=run.config().selection.hide_test)


def finish_local(run: RunDir, code: int) -> None:
    if run.finished:
        # result.json is written last, after model.safetensors and every ensemble member: the run is complete
        # even when a task failed afterwards (while its MPI runtime shut down, say).
        if code != 0:
            click.echo(f"hpc-mto: warning: a task exited with status {code} after the result was written; "
                       "the result is complete", err=True)
        click.echo(summary_line(run))
        return
    if code == EXIT_REQUEUE:
        click.echo(f"hpc-mto: run stopped with a checkpoint; continue it with: hpc-mto resume {run.path}", err=True)
    else:
        click.echo(f"hpc-mto: error: the run failed (exit status {code}); see the messages above. "
                   f"Checkpoints are kept: hpc-mto resume {run.path}", err=True)
    sys.exit(code or 1)


def slurm_options(fn):
    """One option per field of slurm_request.Request, whose help and default live there."""
    for f in reversed(dataclasses.fields(slurm_request.Request)):
        flag, text = f"--{f.name.replace('_', '-')}", f.metadata["help"]
        if isinstance(f.default, bool):
            fn = click.option(flag, is_flag=True, default=None, help=f"SLURM: {text}.")(fn)
        elif isinstance(f.default, tuple):
            fn = click.option(flag, multiple=True, help=f"SLURM: {text}.")(fn)
        else:
            default = "" if f.default is None else f" (default {f.default})"
            kind = int if f.type.startswith("int") else str
            fn = click.option(flag, type=kind, default=None, help=f"SLURM: {text}{default}.")(fn)
    return fn


def given(options: dict) -> dict:
    return {key: value for key, value in options.items() if value is not None and value is not False and value != ()}


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--splits", type=int, help="K: number of splits (shorthand for --set splits=K).")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Run directory (default: runs/<time>-<name>).")
@click.option("--executor", type=click.Choice(["local", "slurm"]),
              help="Where the tasks run (default: slurm when sbatch is on PATH and --partition is given, else local).")
@slurm_options
@click.option("--dry-run", is_flag=True, help="SLURM: print the sbatch script; submit nothing, write nothing.")
@click.option("--wait", is_flag=True, help="SLURM: follow the run until it ends (local runs always do).")
@click.option("--progress/--no-progress", default=None, help="Live per-task progress (default: on a terminal).")
@click.option("--hide-test", is_flag=True,
              help="Keep test scores out of everything printed (selection.hide_test) until report --show-test.")
@user_errors
def launch(config_file, overrides, splits, run_dir, executor, dry_run, wait, progress, hide_test, **slurm_opts):
    """Start a run: write the run directory, then train the K tasks (here, or on SLURM)."""
    from . import api

    overrides = list(overrides) + ([f"splits={splits}"] if splits is not None else []) + \
        (["selection.hide_test=true"] if hide_test else [])
    executor = executor or default_executor(slurm_opts["partition"])
    stray = [f"--{key.replace('_', '-')}" for key in given({**slurm_opts, "dry_run": dry_run})]
    if executor == "local" and stray:
        raise UserError(f"{', '.join(stray)}: only for --executor slurm")
    p = api.plan(config_file, run_dir, executor, overrides, **given(slurm_opts))
    if p.request is not None:
        launch_slurm(p.run, p.cfg, p.request, dry_run, wait, progress)
        return
    finish_local(p.run, api.train_here(p, progress, say=click.echo))


def default_executor(partition: str | None) -> str:
    return "slurm" if partition and shutil.which("sbatch") else "local"


def launch_slurm(run: RunDir, cfg: config_mod.Config, req: slurm_request.Request, dry_run: bool, wait: bool,
                 progress) -> None:
    if dry_run:
        click.echo(f"# dry run: nothing submitted; run directory {run.path} not created", err=True)
        click.echo(slurm_request.sbatch_script(slurm_request.plan(cfg, req, run.path), run.path, req, cfg.splits),
                   nl=False)
        return
    ids = slurm.start(run, cfg, req)
    submitted(run, ids, wait, progress)


def submitted(run: RunDir, ids: list[str], wait: bool, progress) -> None:
    """Report a SLURM submission; with --wait, follow it to the end like a local run."""
    click.echo(f"run directory: {run.path}")
    click.echo(f"submitted SLURM job{'s' * (len(ids) > 1)} {', '.join(ids)}")
    if not wait:
        click.echo(f"follow it with: hpc-mto status {run.path}")
        return
    try:
        states = slurm.follow(run, ids, progress)
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; the job keeps running: hpc-mto status {run.path} "
                   f"(or hpc-mto cancel {run.path})", err=True)
        sys.exit(130)
    if run.finished:
        click.echo(summary_line(run))
        return
    ended = ", ".join(f"{jid} {s.state}" for jid, s in states.items())
    click.echo(f"hpc-mto: error: the run's job ended without finishing it ({ended}); logs in {run.slurm_dir}. "
               f"Checkpoints are kept: hpc-mto resume {run.path}", err=True)
    sys.exit(1)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change a key that is safe to change on resume (e.g. train.epochs).")
@click.option("--wait", is_flag=True, help="SLURM runs: follow the resubmitted job until it ends.")
@click.option("--progress/--no-progress", default=None)
@click.option("--allow-code-change", is_flag=True,
              help="Continue although the code of model.factory changed since the run started.")
@user_errors
def resume(run_dir, overrides, wait, progress, allow_code_change):
    """Continue a stopped run from the newest checkpoint every task completed (a SLURM run is
    resubmitted with the resources it was launched with)."""
    from .api import restart

    run = RunDir(run_dir).require()
    if run.finished and not overrides:
        click.echo(f"run {run.path} already finished")
        click.echo(summary_line(run))
        return
    restarted = restart(run, overrides, allow_code_change, progress, say=click.echo)
    if restarted.jobs is not None:
        submitted(run, restarted.jobs, wait, progress)
    else:
        finish_local(run, restarted.exit_code)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@user_errors
def status(run_dir):
    """Where a run stands: the SLURM state of its jobs and each task's progress."""
    from .launchers.progress import task_line

    run = RunDir(run_dir).require()
    record = run.jobs()
    if record is not None:
        click.echo(f"SLURM {record.mode} run, partition {record.parameters.get('partition', '(default)')}")
        for jid, state in slurm_queries.job_states(record.jobs).items():
            click.echo(slurm_queries.state_line(jid, state))
            log = run.slurm_dir / f"{jid}_0_log.err"  # the batch step's stderr: srun reports there
            if state.live or not log.is_file():
                continue
            lost = slurm_queries.lost_node(log.read_text(errors="replace"))
            if lost:
                node, tasks, how = lost
                click.echo(f"job {jid}: node {node} (task{'s' * (len(tasks) > 1)} {', '.join(map(str, tasks))}) "
                           f"ended the run ({how}); the other tasks were stopped with them. Continue with: "
                           f"hpc-mto resume {run.path}")
    cfg = run.config()
    for task in range(cfg.splits):
        click.echo(task_line(run, task, cfg.train.epochs))
    if run.finished:
        click.echo(summary_line(run))
    elif run.selection_pending():
        click.echo(f"selection pending: every task finished training, but not all were there together for the "
                   f"final selection (array jobs end apart); run it with: hpc-mto resume {run.path}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@user_errors
def cancel(run_dir):
    """Cancel a run's SLURM jobs. Every task checkpoints on the way out: hpc-mto resume continues."""
    run = RunDir(run_dir).require()
    record = run.jobs()
    if record is None:
        raise LaunchError(f"run {run.path} was not launched on SLURM; stop a local run with Ctrl-C")
    ids = slurm.cancel(record)
    click.echo(f"cancelled SLURM job {', '.join(ids)}" if ids else
               f"nothing to cancel: no job of run {run.path} is pending or running")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("input_file", type=click.Path(dir_okay=False))
@click.option("--ensemble/--single", default=None,
              help="The K-model ensemble or the single selected network (default: the run's chosen output).")
@click.option("--preprocessed", is_flag=True, help="The samples are already preprocessed as in training.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write logits and classes here (.npz).")
@user_errors
def predict(run_dir, input_file, ensemble, preprocessed, out):
    """Classify the samples in INPUT_FILE (array x in .npz or .h5, or a tensor in .pt) with a finished run."""
    import numpy as np

    from .api import Run, read_samples

    run = Run(run_dir)
    logits = run.predict(read_samples(Path(input_file)), ensemble=ensemble, preprocessed=preprocessed)
    classes = logits.argmax(1)
    if out:
        from .atomic import atomic_path

        with atomic_path(Path(out)) as tmp, open(tmp, "wb") as f:
            np.savez(f, logits=logits, classes=classes)
        click.echo(f"{len(classes)} samples -> {out} (logits, classes)")
    else:
        click.echo("\n".join(map(str, classes.tolist())))


@main.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["torch-export", "safetensors", "onnx"]), default="torch-export",
              show_default=True, help="torch.export program (.pt2), the weights alone (.safetensors) or ONNX "
                                      "(needs hpc-mto[onnx]).")
@click.option("--ensemble/--single", default=None,
              help="The K-model ensemble or the single selected network (default: the run's chosen output).")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Output file (default: RUN_DIR/model.<ext> or ensemble.<ext>).")
@user_errors
def export_command(run_dir, fmt, ensemble, out):
    """Write a finished run's output in a format other tools load without hpc-mto."""
    from .export import export

    path = export(Path(run_dir), fmt, Path(out) if out else None, ensemble)
    click.echo(f"wrote {path} ({fmt}; takes preprocessed samples, see model.json)")


@main.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (for scripts) instead of tables.")
@click.option("--show-test", is_flag=True, help="Show test scores of runs launched with --hide-test.")
@click.option("--tensorboard", is_flag=True,
              help="Also write RUN_DIR/report/tensorboard/task-<t>/ event files (needs tensorboard installed).")
@user_errors
def report_command(run_dirs, as_json, show_test, tensorboard):
    """Summarize a run (finished, running or stopped) and write RUN_DIR/report/ (plots, report.html).

    With several RUN_DIRs, print one comparison table and write no files (except --tensorboard).
    """
    from . import report

    click.echo(report.show(run_dirs, as_json, tensorboard, show_test))


if __name__ == "__main__":
    main()
