"""Quality benchmark (issue 11): does knowledge transfer give a better model than training on the
whole set, and does the tool's estimate of its output hold on test data?

    .venv/bin/python bench/quality.py                                  # the reported table (make bench-quality)
    .venv/bin/python bench/quality.py --seeds 100 101 102 --tuning     # tuning seeds: holdout figures only

Every (dataset, mode, seed) is one ``hpc-mto launch`` through the real CLI into its own run directory
under --runs-dir, one run at a time. A run whose result.json exists is read, not rerun, so an
interrupted benchmark continues where it stopped. Per-run figures are merged into
bench/results/quality.json; the tables in bench/RESULTS.md are regenerated from it.

Seeds 0-9 are reported. Settings were chosen on seeds 100+ from the selection holdout alone; with
``--tuning`` the printed lines and the tuning table show no test figure, so none can steer a choice.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from _common import (RESULTS_DIR, be_nice, launch_command, machine, machine_line, mean_sd, read_json, run_cli,
                     shell_line, update_results, write_json)

K = 4
OUT = RESULTS_DIR / "quality.json"
REPORTED_SEEDS = list(range(10))


@dataclass(frozen=True)
class Dataset:
    config: str | None
    epochs: int  # chosen on the holdout of tuning seeds (RESULTS.md)
    overrides: tuple[str, ...] = ()  # the dataset's converged recipe, the same in every mode


# Constant learning rate: it beat cosine at every length on the tuning seeds' holdout.
DATASETS = {
    "digits": Dataset(None, 60),
    "mnist1d": Dataset("configs/mnist1d.yaml", 100),
}


@dataclass(frozen=True)
class Mode:
    label: str
    overrides: tuple[str, ...]
    outputs: tuple[str, ...]  # result.json outputs reported, plus candidate ids ("task-0/final")


# The whole-set model: no validation split, SWA over the last half of training (final weights at a
# constant learning rate are unstable: one fell to 71% at its last epoch on a tuning seed).
WHOLE = ("data.val_fraction=0", "selection.rule=holdout", "transfer.policy=none", "train.swa_epochs={swa}")
# The rules as the first landing ran them: every epoch, optimizer state copied, no lineage guard.
OLD = ("transfer.interval=1", "transfer.optimizer_state=copy", "transfer.keep_lineages=0")
MODES = {
    "conventional": Mode("conventional (K=1, one split)", ("splits=1", "transfer.policy=none"), ("single",)),
    "whole": Mode("whole set (K=1)", ("splits=1", *WHOLE), ("task-0/final", "task-0/swa", "single")),
    "whole-ensemble": Mode(f"{K} whole-set models (SWA)", (f"splits={K}", *WHOLE, "selection.output=ensemble"),
                           ("ensemble",)),
    # No student here: this run is the "none" every K=4 mode's wall time is compared with.
    "independent": Mode(f"independent (K={K}, none)", (f"splits={K}", "transfer.policy=none"), ("single", "ensemble")),
    "best-val": Mode("MTO best, old rule (own validation set)",
                     (f"splits={K}", "transfer.policy=best", "transfer.fitness=val", *OLD), ("single", "ensemble")),
    "best-unseen": Mode("MTO best, unseen rule", (f"splits={K}", "transfer.policy=best", "transfer.fitness=unseen",
                                                  "transfer.interval=1"), ("single", "ensemble")),
    "average": Mode("MTO average at rounds (shared init)",
                    (f"splits={K}", "transfer.policy=average", "model.shared_init=true", *OLD),
                    ("single", "ensemble", "soup")),
    "average-gradual": Mode("MTO average, gradual (PAPA, shared init)",
                            (f"splits={K}", "transfer.policy=average", "model.shared_init=true",
                             "transfer.average_steps=10", "transfer.average_rate=0.1"),
                            ("single", "ensemble", "soup")),
    "distill": Mode("MTO distill (defaults)", (f"splits={K}", "transfer.policy=distill", "selection.distill_output=true"),
                    ("single", "ensemble", "student")),
}
LABELS = {"single": "single (selected)", "ensemble": "K-ensemble", "soup": "greedy soup", "student": "student",
          "task-0/final": "final weights", "task-0/swa": "SWA weights"}
BASELINE = ("whole", "task-0/final")  # the converged whole-set model every row is paired with


# -- running -------------------------------------------------------------------------------------
def run_dir_for(runs: Path, dataset: str, mode: str, seed: int) -> Path:
    return runs / dataset / mode / f"seed-{seed}"


def command(run_dir: Path, dataset: str, mode: str, seed: int, extra: list[str]) -> list[str]:
    ds = DATASETS[dataset]
    swa = max(1, ds.epochs // 2)  # SWA over the last half of training
    overrides = [f"data.name={dataset}", f"seed={seed}", f"train.epochs={ds.epochs}", *ds.overrides]
    overrides += [o.format(swa=swa) for o in MODES[mode].overrides] + extra
    return launch_command(run_dir, ds.config, overrides)


def finished(run_dir: Path, cmd: list[str]) -> bool:
    stamp = run_dir / "bench.json"
    return (run_dir / "result.json").exists() and stamp.exists() and read_json(stamp)["command"] == shell_line(cmd)


def ensure_run(run_dir: Path, cmd: list[str]) -> float:
    """Run unless it finished before with the same command; returns its wall time."""
    stamp = run_dir / "bench.json"
    if finished(run_dir, cmd):
        return read_json(stamp)["wall_s"]
    shutil.rmtree(run_dir, ignore_errors=True)  # interrupted or changed: start it again from nothing
    t0 = time.perf_counter()
    run_cli(cmd)
    wall = time.perf_counter() - t0
    write_json(stamp, {"command": shell_line(cmd), "wall_s": wall})
    return wall


# -- reading one run -----------------------------------------------------------------------------
def output_figures(r: dict, name: str) -> dict:
    """One output's figures: a result output (single, ensemble, ...) or a candidate by id."""
    if name in r["outputs"]:
        o = r["outputs"][name]
        return {"id": o["id"], "select_acc": o["select_acc"], "estimate_acc": o["estimate_acc"],
                "estimate_loss": o["estimate_loss"], "test_acc": o["test_acc"], "test_loss": o["test_loss"],
                "test_ece": o["test_ece"]}
    c = next(c for c in r["candidates"] if c["id"] == name)
    return {"id": c["id"], "select_acc": c["select_acc"], "estimate_acc": c["estimate_acc"],
            "estimate_loss": c["estimate_loss"], "test_acc": c["test_acc"], "test_loss": c["test_loss"],
            "test_ece": c["test_ece"]}


def transfer_stats(run_dir: Path, k: int) -> dict | None:
    from hpc_mto.rundir import RunDir

    logs = [RunDir(run_dir).transfers(t).read() for t in range(k)]
    rounds = list(zip(*logs))
    if not rounds:
        return None
    return {"rounds": len(rounds), "accepted_per_round": statistics.fmean(sum(d.accepted for d in r) for r in rounds)}


def summarize(run_dir: Path, mode: Mode) -> dict:
    r = read_json(run_dir / "result.json")
    outputs = {name: output_figures(r, name) for name in mode.outputs if name in r["outputs"]
               or any(c["id"] == name for c in r["candidates"])}
    return {"k": r["k"], "outputs": outputs, "output": r["output"], "estimate": r["estimate"],
            "estimate_samples": r["estimate_samples"], "lineages_left": r["lineages_left"],
            "disagreement": r["disagreement"], "transfer": transfer_stats(run_dir, r["k"]),
            "timing": r["timing"]["total"]}


def measure(runs: Path, dataset: str, mode: str, seed: int, extra: list[str]) -> dict:
    run_dir = run_dir_for(runs, dataset, mode, seed)
    cmd = command(run_dir, dataset, mode, seed, extra)
    wall = ensure_run(run_dir, cmd)
    return {"dataset": dataset, "mode": mode, "seed": seed, "epochs": DATASETS[dataset].epochs,
            "command": shell_line(cmd), "wall_s": wall, **summarize(run_dir, MODES[mode])}


def key(rec: dict) -> tuple:
    return rec["dataset"], rec["mode"], rec["seed"]


# -- statistics ----------------------------------------------------------------------------------
def pct(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    m, sd = mean_sd(values)
    return f"{100 * m:.2f} ± {100 * sd:.2f}" if len(values) > 1 else f"{100 * m:.2f}"


def bootstrap_ci(diffs: list[float], reps: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of paired differences, resampling seeds."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(reps))
    return means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def paired_vs_baseline(group: list[dict], mode: str, output: str) -> str:
    base = {r["seed"]: r["outputs"][BASELINE[1]]["test_acc"] for r in group if r["mode"] == BASELINE[0]}
    diffs = [r["outputs"][output]["test_acc"] - base[r["seed"]] for r in group
             if r["mode"] == mode and output in r["outputs"] and r["seed"] in base]
    if not diffs or (mode, output) == BASELINE:
        return "—"
    lo, hi = bootstrap_ci(diffs)
    return f"{100 * statistics.fmean(diffs):+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def wall_ratio(group: list[dict], mode: str) -> str:
    """Wall time over the same seed's run without transfer (independent K=4; K=1 modes: conventional)."""
    ref_mode = "conventional" if MODES[mode].overrides[0] == "splits=1" else "independent"
    ref = {r["seed"]: r["wall_s"] for r in group if r["mode"] == ref_mode}
    ratios = [r["wall_s"] / ref[r["seed"]] for r in group if r["mode"] == mode and r["seed"] in ref]
    return f"{statistics.median(ratios):.2f}×" if ratios else "—"


def mean_or_dash(values, fmt="{:.2f}", scale=1.0) -> str:
    values = [v for v in values if v is not None]
    return fmt.format(scale * statistics.fmean(values)) if values else "—"


# -- tables --------------------------------------------------------------------------------------
def main_table(group: list[dict]) -> list[str]:
    lines = ["| mode | output | seeds | test acc % | Δ vs whole-set final, 95% CI (points) | estimate − test | "
             "log-loss | ECE % | disagreement % | lineages left | wall vs none |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, m in MODES.items():
        runs = [r for r in group if r["mode"] == mode]
        if not runs:
            continue
        for out in m.outputs:
            vals = [r["outputs"][out] for r in runs if out in r["outputs"]]
            if not vals:
                continue
            gaps = [v["estimate_acc"] - v["test_acc"] for v in vals if v["estimate_acc"] is not None]
            lines.append(
                f"| {m.label} | {LABELS[out]} | {len(vals)} | {pct([v['test_acc'] for v in vals])} | "
                f"{paired_vs_baseline(group, mode, out)} | {mean_or_dash(gaps, '{:+.2f}', 100)} "
                f"(|·| {mean_or_dash([abs(g) for g in gaps], '{:.2f}', 100)}) | "
                f"{mean_or_dash([v['test_loss'] for v in vals], '{:.3f}')} | "
                f"{mean_or_dash([v['test_ece'] for v in vals], '{:.1f}', 100)} | "
                f"{mean_or_dash([r['disagreement'] for r in runs], '{:.1f}', 100) if out == 'ensemble' else '—'} | "
                f"{mean_or_dash([r['lineages_left'] for r in runs], '{:.1f}')} | {wall_ratio(group, mode)} |")
    return lines


def estimate_table(group: list[dict]) -> list[str]:
    """The tool's own estimate of what it outputs (auto), against test."""
    lines = ["| mode | output chosen (count over seeds) | estimate % | test % | mean |estimate − test| (points) |",
             "|---|---|---|---|---|"]
    for mode, m in MODES.items():
        runs = [r for r in group if r["mode"] == mode]
        if not runs or mode == "whole-ensemble":
            continue
        counts = ", ".join(f"{o} {sum(r['output'] == o for r in runs)}" for o in sorted({r["output"] for r in runs}))
        tests = [r["outputs"].get(r["output"], {}).get("test_acc") for r in runs]
        pairs = [(r["estimate"], t) for r, t in zip(runs, tests) if r["estimate"] is not None and t is not None]
        lines.append(f"| {m.label} | {counts} | {pct([e for e, _ in pairs])} | {pct([t for _, t in pairs])} | "
                     f"{mean_or_dash([abs(e - t) for e, t in pairs], '{:.2f}', 100)} |"
                     if pairs else f"| {m.label} | {counts} | — | — | — |")
    return lines


def tuning_table(group: list[dict]) -> list[str]:
    """Tuning seeds: holdout figures only (selection half and estimation half), never test."""
    lines = ["| mode | output | select-half acc % | estimate-half acc % | lineages left | accepted per round |",
             "|---|---|---|---|---|---|"]
    for mode, m in MODES.items():
        runs = [r for r in group if r["mode"] == mode]
        for out in (m.outputs if runs else ()):
            vals = [r["outputs"][out] for r in runs if out in r["outputs"]]
            acc = [r["transfer"]["accepted_per_round"] for r in runs if r["transfer"]]
            lines.append(f"| {m.label} | {LABELS[out]} | {pct([v['select_acc'] for v in vals])} | "
                         f"{pct([v['estimate_acc'] for v in vals])} | "
                         f"{mean_or_dash([r['lineages_left'] for r in runs], '{:.1f}')} | "
                         f"{mean_or_dash(acc, '{:.2f}')} |")
    return lines


def render(records: list[dict], meta: dict) -> str:
    out = [f"Machine: {machine_line(meta['machine'])}.", ""]
    for dataset in DATASETS:
        group = [r for r in records if r["dataset"] == dataset and r["seed"] in REPORTED_SEEDS]
        tuning = [r for r in records if r["dataset"] == dataset and r["seed"] not in REPORTED_SEEDS]
        if group:
            seeds = sorted({r["seed"] for r in group})
            out += [f"### {dataset}: {DATASETS[dataset].epochs} epochs, constant learning rate, K={K}, seeds "
                    f"{seeds[0]}–{seeds[-1]} ({len(seeds)})", "",
                    f"Wall time of these runs: {sum(r['wall_s'] for r in group) / 60:.0f} min.", ""]
            out += main_table(group) + ["", "The tool's estimate of its own output (`selection.output=auto`):", ""]
            out += estimate_table(group) + [""]
            out += ["Commands (seed 0; other seeds change `seed=`):", "", "```"]
            out += [r["command"] for r in sorted(group, key=lambda r: list(MODES).index(r["mode"]))
                    if r["seed"] == seeds[0]] + ["```", ""]
        if tuning:
            seeds = sorted({r["seed"] for r in tuning})
            out += [f"#### {dataset}, tuning seeds {seeds}: holdout only", ""] + tuning_table(tuning) + [""]
    return "\n".join(out)


def run_line(rec: dict, tuning: bool) -> str:
    fields = ("select_acc", "estimate_acc") if tuning else ("select_acc", "estimate_acc", "test_acc")
    return "  ".join(f"{name}: " + "/".join(pct([o[f]]) for f in fields) for name, o in rec["outputs"].items())


# -- entry point ---------------------------------------------------------------------------------
def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--seeds", nargs="+", type=int, default=REPORTED_SEEDS)
    p.add_argument("--tuning", action="store_true", help="show holdout figures only (for seeds that are not reported)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every run (tuning variants; the run directory gets --tag)")
    p.add_argument("--tag", default="", help="suffix of the mode names for runs with --set overrides")
    p.add_argument("--runs-dir", type=Path, default=Path("/tmp/bench-runs"), help="scratch run directories")
    p.add_argument("--finished-only", action="store_true",
                   help="start no run: read the finished ones among those selected and rewrite the tables")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.tuning and set(args.seeds) & set(REPORTED_SEEDS):
        raise SystemExit("--tuning is for seeds that are not reported (not 0-9)")
    be_nice()
    saved = read_json(OUT, {"runs": []})
    records = {key(r): r for r in saved["runs"]}
    meta = {"machine": saved.get("machine") or machine(), "k": K}
    runs_dir = args.runs_dir / args.tag if args.tag else args.runs_dir
    for dataset in args.datasets:
        for seed in args.seeds:
            for mode in args.modes:
                if args.finished_only:
                    run_dir = run_dir_for(runs_dir, dataset, mode, seed)
                    if not finished(run_dir, command(run_dir, dataset, mode, seed, args.extra)):
                        continue
                rec = measure(runs_dir, dataset, mode, seed, args.extra)
                if args.tag:
                    rec = {**rec, "mode": f"{mode}+{args.tag}"}
                    print(f"{dataset:8} {rec['mode']:24} seed {seed}: {run_line(rec, args.tuning)}", flush=True)
                    continue  # tagged variants are printed, not merged into the tables
                records[key(rec)] = rec
                write_json(OUT, {**meta, "runs": sorted(records.values(), key=key)})  # keep what we have
                print(f"{dataset:8} {mode:24} seed {seed}: {run_line(rec, args.tuning)}  ({rec['wall_s']:.0f} s)",
                      flush=True)
    if args.tag:
        return  # tagged variants leave the tables alone
    text = render(sorted(records.values(), key=key), meta)
    update_results("quality", text)
    if not args.tuning:
        print(text)


if __name__ == "__main__":
    main()
