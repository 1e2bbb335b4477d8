"""Quality benchmark (issue 6): does MTO beat conventional training, and which estimate can be trusted?

    .venv/bin/python bench/quality.py                                   # main table (make bench-quality)
    .venv/bin/python bench/quality.py --modes tuning --datasets mnist1d --seeds 0 1   # tuning runs

Every (dataset, mode, seed) is one ``hpc-mto launch`` through the real CLI into its own run directory
under --runs-dir, one run at a time. A run whose result.json exists is read, not rerun, so an
interrupted benchmark continues where it stopped and subsets can be added later. Per-run figures are
merged into bench/results/quality.json; the tables in bench/RESULTS.md are regenerated from it.
Tuning reads the selection holdout only: its table has no test column on purpose.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from _common import (RESULTS_DIR, be_nice, launch_command, machine, machine_line, mean_sd, read_json, run_cli,
                     shell_line, update_results, write_json)

K = 4
OUT = RESULTS_DIR / "quality.json"


@dataclass(frozen=True)
class Dataset:
    config: str | None
    epochs: int  # measured: the whole main table then takes ~40 min on 2 shared cores
    whole_val: float  # smallest val_fraction leaving the one sample per class the splitter requires


DATASETS = {
    "digits": Dataset(None, 20, 0.005),
    "mnist1d": Dataset("configs/mnist1d.yaml", 30, 0.003),
}


@dataclass(frozen=True)
class Mode:
    label: str
    overrides: tuple[str, ...]  # "{whole_val}" is filled in from the dataset
    group: str  # "main" (the results table) or "tuning"
    output: str | None = None  # K=1 modes: the candidate that is the mode's output
    base: str | None = None  # tuning variants: the default mode they vary
    val_estimate: bool = True  # False: its validation set is too small to quote as an estimate


BEST = (f"splits={K}", "transfer.policy=best")
# Averaging independently initialised networks destroys them (PROTOTYPE.md): average from one init.
AVERAGE = (f"splits={K}", "transfer.policy=average", "model.shared_init=true")
MODES = {
    "conventional": Mode("conventional (K=1, best-val snapshot)", ("splits=1", "transfer.policy=none"),
                         "main", "task-0/best"),
    # No validation split at all is not expressible (the splitter wants one sample per class), so
    # the whole-set model holds out 10 samples and we take its final weights, not a val-chosen epoch.
    "whole": Mode("whole gross training set (K=1, final weights)",
                  ("splits=1", "transfer.policy=none", "data.val_fraction={whole_val}"), "main", "task-0/final",
                  val_estimate=False),
    "independent": Mode(f"independent (K={K}, none)", (f"splits={K}", "transfer.policy=none"), "main"),
    "mto-best": Mode("MTO best (defaults)", BEST, "main"),
    "mto-average": Mode("MTO average (shared init)", AVERAGE, "main"),
    "best-interval5": Mode("best, interval 5", BEST + ("transfer.interval=5",), "tuning", base="mto-best"),
    "best-fitness-train": Mode("best, fitness train", BEST + ("transfer.fitness=train",), "tuning", base="mto-best"),
    "best-min-gain": Mode("best, min_gain 0.02", BEST + ("transfer.min_gain=0.02",), "tuning", base="mto-best"),
    "best-opt-reset": Mode("best, optimizer_state reset", BEST + ("transfer.optimizer_state=reset",), "tuning",
                           base="mto-best"),
    "best-opt-keep": Mode("best, optimizer_state keep", BEST + ("transfer.optimizer_state=keep",), "tuning",
                          base="mto-best"),
    "average-interval5": Mode("average, interval 5", AVERAGE + ("transfer.interval=5",), "tuning",
                              base="mto-average"),
}
GROUPS = {"main": [m for m, v in MODES.items() if v.group == "main"],
          # the tuning variants next to the defaults they vary
          "tuning": ["mto-best", "mto-average"] + [m for m, v in MODES.items() if v.group == "tuning"]}
OUTPUTS = {"single": "", "cv_mean": "CV-row-mean choice", "holdout": "holdout choice", "ensemble": "K-ensemble"}


# -- running -------------------------------------------------------------------------------------
def run_dir_for(runs: Path, dataset: str, mode: str, seed: int, epochs: int) -> Path:
    return runs / f"{dataset}-e{epochs}" / mode / f"seed-{seed}"


def command(run_dir: Path, dataset: str, mode: str, seed: int, epochs: int) -> list[str]:
    ds, m = DATASETS[dataset], MODES[mode]
    overrides = [f"data.name={dataset}", f"seed={seed}", f"train.epochs={epochs}"]
    overrides += [o.format(whole_val=ds.whole_val) for o in m.overrides]
    return launch_command(run_dir, ds.config, overrides)


def ensure_run(run_dir: Path, cmd: list[str]) -> float:
    """Run unless it finished before; returns its wall time (kept beside the run for reruns)."""
    stamp = run_dir / "bench.json"
    if (run_dir / "result.json").exists() and stamp.exists():
        return read_json(stamp)["wall_s"]
    shutil.rmtree(run_dir, ignore_errors=True)  # interrupted: start it again from nothing
    t0 = time.perf_counter()
    run_cli(cmd)
    wall = time.perf_counter() - t0
    write_json(stamp, {"command": shell_line(cmd), "wall_s": wall})
    return wall


# -- reading one run -----------------------------------------------------------------------------
def pick(d: dict) -> dict:
    return {key: d.get(key) for key in ("id", "test_acc", "cv_mean_acc", "holdout_acc")}


def transfer_stats(run_dir: Path, k: int) -> dict | None:
    """Acceptance, and whether the population collapsed to one lineage (PROTOTYPE.md's question)."""
    from hpc_mto.rundir import RunDir

    logs = [RunDir(run_dir).transfers(t).read() for t in range(k)]
    rounds = list(zip(*logs))  # one tuple of K decisions per round
    if not rounds:
        return None
    lineages = [len({tuple(d["lineage"]) for d in r}) for r in rounds]
    return {"rounds": len(rounds),
            "accepted_per_round": statistics.fmean(sum(d["accepted"] for d in r) for r in rounds),
            "one_lineage_from_round": next((r[0]["round"] for r, n in zip(rounds, lineages) if n == 1), None),
            "lineages_at_end": lineages[-1]}


def summarize(run_dir: Path, mode: Mode) -> dict:
    from hpc_mto import splits

    r = read_json(run_dir / "result.json")
    s, _ = splits.read(run_dir / "splits.h5")
    candidates = [{key: c[key] for key in ("id", "kind", "test_acc", "cv_mean_acc", "holdout_acc", "lineage")}
                  for c in r["candidates"]]
    if mode.output:
        outputs = {"single": pick(next(c for c in candidates if c["id"] == mode.output))}
        if not mode.val_estimate:
            outputs["single"]["cv_mean_acc"] = None
    else:
        outputs = {rule: pick(r["choices"][rule]) for rule in ("cv_mean", "holdout")}
        outputs["ensemble"] = pick({"id": "ensemble", **r["ensemble"]})
    return {"k": r["k"], "outputs": outputs, "candidates": candidates,
            "sizes": {"train": len(s.train[0]), "val": len(s.val[0]), "holdout": len(s.holdout)},
            "transfer": transfer_stats(run_dir, r["k"]), "timing": r["timing"]["total"]}


def measure(runs: Path, dataset: str, mode: str, seed: int, epochs: int) -> dict:
    run_dir = run_dir_for(runs, dataset, mode, seed, epochs)
    cmd = command(run_dir, dataset, mode, seed, epochs)
    wall = ensure_run(run_dir, cmd)
    return {"dataset": dataset, "mode": mode, "seed": seed, "epochs": epochs, "command": shell_line(cmd),
            "wall_s": wall, **summarize(run_dir, MODES[mode])}


def key(rec: dict) -> tuple:
    return rec["dataset"], rec["epochs"], rec["mode"], rec["seed"]


# -- tables --------------------------------------------------------------------------------------
def pct(values: list[float]) -> str:
    if not values:
        return "—"
    m, sd = mean_sd(values)
    return f"{100 * m:.2f} ± {100 * sd:.2f}" if len(values) > 1 else f"{100 * m:.2f}"


def gap(est: list, test: list) -> str:
    pairs = [(e, t) for e, t in zip(est, test) if e is not None]
    return f"{100 * statistics.fmean(e - t for e, t in pairs):+.2f}" if pairs else "—"


def versus(conventional: dict[int, float], runs: list[dict], out: str) -> str:
    """Seeds where this output's test accuracy beat / tied / lost to conventional training's."""
    diffs = [r["outputs"][out]["test_acc"] - conventional[r["seed"]] for r in runs if r["seed"] in conventional]
    if not diffs:
        return "—"
    return f"{sum(d > 0 for d in diffs)}/{sum(d == 0 for d in diffs)}/{sum(d < 0 for d in diffs)}"


def by_mode(records: list[dict], mode: str) -> list[dict]:
    return [r for r in records if r["mode"] == mode]


def main_table(records: list[dict]) -> list[str]:
    conv = {r["seed"]: r["outputs"]["single"]["test_acc"] for r in records if r["mode"] == "conventional"}
    lines = ["| mode | output | test acc % | its CV row mean % | its holdout % | CV − test | holdout − test "
             "| beats conventional (W/T/L seeds) |", "|---|---|---|---|---|---|---|---|"]
    for mode in GROUPS["main"]:
        runs = by_mode(records, mode)
        for out in (runs[0]["outputs"] if runs else []):
            vals = [r["outputs"][out] for r in runs]
            test, cv, ho = ([v[f] for v in vals] for f in ("test_acc", "cv_mean_acc", "holdout_acc"))
            vs = "—" if mode == "conventional" else versus(conv, runs, out)
            lines.append(f"| {MODES[mode].label} | {OUTPUTS[out]} | {pct(test)} | "
                         f"{pct([c for c in cv if c is not None])} | {pct(ho)} | {gap(cv, test)} | "
                         f"{gap(ho, test)} | {vs} |")
    return lines


def mean_holdout(run: dict) -> float:
    """Holdout accuracy averaged over all 2K candidates: the typical model, without selection noise."""
    return statistics.fmean(c["holdout_acc"] for c in run["candidates"])


def paired(runs: list[dict], base: list[dict]) -> str:
    """Mean difference of mean_holdout against the default on the same seeds."""
    ref = {r["seed"]: mean_holdout(r) for r in base}
    diffs = [mean_holdout(r) - ref[r["seed"]] for r in runs if r["seed"] in ref]
    return f"{100 * statistics.fmean(diffs):+.2f}" if diffs else "—"


def tuning_table(records: list[dict]) -> list[str]:
    seeds = {r["seed"] for r in records if MODES[r["mode"]].group == "tuning"}
    lines = ["| setting | holdout acc of holdout choice % | ensemble holdout % | mean holdout over 2K candidates % "
             "| Δ vs default, same seeds | accepted per round (of K) | lineages at end | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in GROUPS["tuning"]:
        runs = [r for r in records if r["mode"] == mode and r["seed"] in seeds]
        if not runs:
            continue
        chosen = [r["outputs"]["holdout"]["holdout_acc"] for r in runs]
        ens = [r["outputs"]["ensemble"]["holdout_acc"] for r in runs]
        base = MODES[mode].base
        delta = paired(runs, by_mode(records, base)) if base else "—"
        acc = [r["transfer"]["accepted_per_round"] for r in runs if r["transfer"]]
        lin = [str(r["transfer"]["lineages_at_end"]) for r in runs if r["transfer"]]
        lines.append(f"| {MODES[mode].label} | {pct(chosen)} | {pct(ens)} | {pct([mean_holdout(r) for r in runs])} | "
                     f"{delta} | {statistics.fmean(acc) if acc else 0:.2f} | {', '.join(lin) or '—'} | "
                     f"{', '.join(str(r['seed']) for r in runs)} |")
    return lines


def mean_test(runs: list[dict], out: str) -> float:
    return statistics.fmean(r["outputs"][out]["test_acc"] for r in runs)


def ensemble_vs_mto(records: list[dict]) -> list[str]:
    """PROTOTYPE.md: the equal-compute independent ensemble beat every MTO setting."""
    ind = by_mode(records, "independent")
    mto = {(m, o): mean_test(by_mode(records, m), o) for m in ("mto-best", "mto-average") if by_mode(records, m)
           for o in ("cv_mean", "holdout", "ensemble")}
    if not (ind and mto):
        return []
    top, ens = max(mto, key=mto.get), mean_test(ind, "ensemble")
    return [f"- Independent K-ensemble {100 * ens:.2f}% vs the best MTO output ({top[0]}, {OUTPUTS[top[1]]}) "
            f"{100 * mto[top]:.2f}%: the ensemble {'beats' if ens > mto[top] else 'does not beat'} every MTO setting."]


def lineage_collapse(records: list[dict]) -> list[str]:
    """PROTOTYPE.md: `best` makes every task descend from one initialisation."""
    t = [r["transfer"] for r in by_mode(records, "mto-best") if r["transfer"]]
    if not t:
        return []
    return [f"- MTO best: {statistics.fmean(x['accepted_per_round'] for x in t):.2f} of {K} tasks adopt a peer per "
            f"round; lineages left at the end per seed: {[x['lineages_at_end'] for x in t]}; one lineage from "
            f"round {[x['one_lineage_from_round'] for x in t]} (None: never)."]


def saturation(records: list[dict]) -> list[str]:
    """PROTOTYPE.md: the CV row mean saturates while test accuracy does not; and the ensemble gain,
    which shrinks as the K models become copies of one another."""
    lines = []
    for mode in ("independent", "mto-best", "mto-average"):
        runs = by_mode(records, mode)
        if not runs:
            continue
        members = statistics.fmean(statistics.fmean(c["test_acc"] for c in r["candidates"] if c["kind"] == "best")
                                   for r in runs)
        cv = [r["outputs"]["cv_mean"]["cv_mean_acc"] for r in runs]
        test = [r["outputs"]["cv_mean"]["test_acc"] for r in runs]
        lines.append(f"- {MODES[mode].label}: CV row mean of the chosen model {pct(cv)}% (max {100 * max(cv):.2f}) "
                     f"vs its test {pct(test)}%; ensemble gain over the mean best snapshot "
                     f"{100 * (mean_test(runs, 'ensemble') - members):+.2f} points.")
    return lines


def same_as_task0(records: list[dict]) -> list[str]:
    """Conventional training is task 0 of the independent run (same split, init, order): a check."""
    conv = {r["seed"]: r["outputs"]["single"]["test_acc"] for r in by_mode(records, "conventional")}
    pairs = [(next(c["test_acc"] for c in r["candidates"] if c["id"] == "task-0/best"), conv[r["seed"]])
             for r in by_mode(records, "independent") if r["seed"] in conv]
    if not pairs:
        return []
    return [f"- Check: conventional training has the test accuracy of task 0 of the independent run (same split, "
            f"init, order) on {sum(a == b for a, b in pairs)} of {len(pairs)} seeds."]


def findings(records: list[dict]) -> list[str]:
    """The prototype's claims, checked on this group's runs (computed, not written by hand)."""
    return ensemble_vs_mto(records) + lineage_collapse(records) + saturation(records) + same_as_task0(records)


def render(records: list[dict], meta: dict) -> str:
    out = [f"Machine: {machine_line(meta['machine'])}.", ""]
    for (dataset, epochs) in sorted({(r["dataset"], r["epochs"]) for r in records}):
        group = [r for r in records if (r["dataset"], r["epochs"]) == (dataset, epochs)]
        main = [r for r in group if MODES[r["mode"]].group == "main"]
        sizes = {r["mode"]: r["sizes"] for r in main}
        out += [f"### {dataset}, {epochs} epochs per model, K={K}, seeds "
                f"{sorted({r['seed'] for r in main})}", ""]
        out += ["Samples: " + "; ".join(f"{m} {s['train']} train / {s['val']} val" for m, s in sizes.items()
                                        if m in ("conventional", "whole"))
                + f"; selection holdout {next(iter(sizes.values()))['holdout']}. "
                f"Wall time of these runs: {sum(r['wall_s'] for r in main) / 60:.1f} min.", ""]
        out += main_table(main) + [""] + findings(main) + [""]
        if any(MODES[r["mode"]].group == "tuning" for r in group):
            out += [f"Tuning on the selection holdout ({dataset}; no test figures): wall time "
                    f"{sum(r['wall_s'] for r in group if MODES[r['mode']].group == 'tuning') / 60:.1f} min "
                    "beyond the baselines.", ""] + tuning_table(group) + [""]
        out += ["Commands (seed 0; other seeds change `seed=`):", "", "```"]
        out += [r["command"] for r in sorted(group, key=lambda r: list(MODES).index(r["mode"])) if r["seed"] == 0]
        out += ["```", ""]
    return "\n".join(out)


def run_line(rec: dict) -> str:
    """One run's output; tuning runs show no test figure, so that none can steer the tuning."""
    main = MODES[rec["mode"]].group == "main"
    sel = rec["outputs"].get("single") or rec["outputs"]["cv_mean" if main else "holdout"]
    fields = ((("test", "test_acc"),) if main else ()) + (("cv", "cv_mean_acc"), ("holdout", "holdout_acc"))
    return "  ".join(f"{name} {pct([sel[f]] if sel[f] is not None else [])}" for name, f in fields)


# -- entry point ---------------------------------------------------------------------------------
def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--modes", nargs="+", default=["main"], choices=list(MODES) + list(GROUPS),
                   help="mode names, or a group: main, tuning")
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(5)))
    p.add_argument("--epochs", type=int, help="epochs for every dataset (default: per dataset)")
    p.add_argument("--runs-dir", type=Path, default=Path("/tmp/bench-runs"), help="scratch run directories")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    be_nice()
    modes = list(dict.fromkeys(m for name in args.modes for m in GROUPS.get(name, [name])))
    saved = read_json(OUT, {"runs": []})
    records = {key(r): r for r in saved["runs"]}
    meta = {"machine": saved.get("machine") or machine(), "k": K,
            "epochs": {d: v.epochs for d, v in DATASETS.items()}}
    for dataset in args.datasets:
        for mode in modes:
            for seed in args.seeds:
                rec = measure(args.runs_dir, dataset, mode, seed, args.epochs or DATASETS[dataset].epochs)
                records[key(rec)] = rec
                write_json(OUT, {**meta, "runs": sorted(records.values(), key=key)})  # keep what we have
                print(f"{dataset:8} {mode:18} seed {seed}: {run_line(rec)}  ({rec['wall_s']:.0f} s)", flush=True)
    text = render(sorted(records.values(), key=key), meta)
    update_results("quality", text)
    print(text)


if __name__ == "__main__":
    main()
