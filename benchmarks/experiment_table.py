"""Tabulate several ``chexseg experiment`` runs (one per seed) as markdown: the comparison mean per mode and seed,
the gains against the paper's, per-pathology means over the seeds, and the stage times.

Usage::

    python benchmarks/experiment_table.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR is an experiment's --out (it holds results.json). Nothing here is used by the package.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Any

MODES = ("weak", "full", "semi", "distill")
PAPER = {"semi_vs_full": 0.097, "semi_vs_weak": 0.731}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def _seed(run: dict[str, Any], path: str) -> str:
    meta = os.path.join(run.get("data", ""), "phantom_meta.json")
    if os.path.exists(meta):
        with open(meta) as f:
            return str(json.load(f).get("seed", path))
    return os.path.basename(path.rstrip("/"))


def _total(stage_seconds: dict[str, float], word: str) -> float:
    return sum(v for k, v in stage_seconds.items() if word in k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()
    runs = []
    for path in args.runs:
        with open(os.path.join(path, "results.json")) as f:
            runs.append((path, json.load(f)))
    print("| seed | weak | full | semi | distill | semi vs full (paper +9.7%) | semi vs weak (paper +73.1%) |")
    print("|---|---|---|---|---|---|---|")
    for path, run in runs:
        cells = [f"{run['modes'][m]['mean_miou']:.4f}" for m in MODES]
        g = run["gains"]
        print(
            f"| {_seed(run, path)} | "
            + " | ".join(cells)
            + f" | {_pct(g['semi_vs_full'])} | {_pct(g['semi_vs_weak'])} |"
        )
    means = {m: statistics.mean(r["modes"][m]["mean_miou"] for _, r in runs) for m in MODES}
    print(
        "| **mean** | "
        + " | ".join(f"**{means[m]:.4f}**" for m in MODES)
        + f" | {_pct(means['semi'] / means['full'] - 1)} | {_pct(means['semi'] / means['weak'] - 1)} |"
    )
    for key, label in (("sensitivity_exact_experts", "exact expert masks (sensitivity)"),):
        rows = [(p, r[key]) for p, r in runs if key in r]
        for path, entry in rows:
            cells = [f"{entry['modes'][m]['mean_miou']:.4f}" for m in MODES]
            g = entry["gains"]
            print(
                f"| {_seed(dict(runs)[path], path)}, {label} | "
                + " | ".join(cells)
                + f" | {_pct(g['semi_vs_full'])} | {_pct(g['semi_vs_weak'])} |"
            )
    refs = sorted({name for _, r in runs for name in r.get("reference", {})})
    if refs:
        print("\n| reference row | " + " | ".join(_seed(r, p) for p, r in runs) + " |")
        print("|---|" + "---|" * len(runs))
        for name in refs:
            vals = [r["reference"].get(name, {}).get("mean_miou") for _, r in runs]
            print(f"| {name} | " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in vals) + " |")
    scored = runs[0][1]["pathologies_scored"]
    print("\nPer pathology, mean over the seeds (tp-only mIoU; a pathology without a kept pair counts 0):\n")
    print("| pathology | " + " | ".join(MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    for name in scored:
        vals = []
        for m in MODES:
            per = [
                r["modes"][m]["pathologies"][name]["miou"] or 0.0 for _, r in runs if name in r["pathologies_scored"]
            ]
            vals.append(f"{statistics.mean(per):.3f}")
        print(f"| {name} | " + " | ".join(vals) + " |")
    refiner_tables(runs)
    print("\n| seed | total s | classifier s | pseudo-labelling s | students s (train) | segment + evaluate s |")
    print("|---|---|---|---|---|---|")
    for path, run in runs:
        st = run["stage_seconds"]
        parts = [_total(st, "classifier"), _total(st, "pseudo-label"), _total(st, ": train ")]
        parts.append(_total(st, "segment") + _total(st, "evaluate"))
        print(f"| {_seed(run, path)} | {run['total_seconds']:.0f} | " + " | ".join(f"{v:.0f}" for v in parts) + " |")


def refiner_tables(runs: list[tuple[str, dict[str, Any]]]) -> None:
    """With --refiners: pseudo-label mIoU and the weak / semi students per refiner and seed, and the pseudo-labels'
    per-pathology mIoU (mean over seeds, with each seed's 95% CI) against the unrefined tuned Grad-CAM masks."""
    with_refiners = [(p, r) for p, r in runs if "refiners" in r]
    if not with_refiners:
        return
    names = list(dict.fromkeys(n for _, r in with_refiners for n in r["refiners"]))
    print("\n| seed | " + " | ".join(f"{n}: pseudo | {n}: weak | {n}: semi" for n in names) + " |")
    print("|---|" + "---|---|---|" * len(names))
    for path, run in with_refiners:
        cells = []
        for n in names:
            row = run["refiners"].get(n)
            cells += ["n/a"] * 3 if row is None else [f"{row[k]:.4f}" for k in ("pseudo_miou", "weak", "semi")]
        print(f"| {_seed(run, path)} | " + " | ".join(cells) + " |")
    for n in names:
        rows = [r["refiners"][n] for _, r in with_refiners if n in r["refiners"]]
        if len(rows) == len(with_refiners):
            mean = {k: statistics.mean(x[k] for x in rows) for k in ("pseudo_miou", "weak", "semi")}
            print(
                f"mean over {len(rows)} seeds, {n}: pseudo {mean['pseudo_miou']:.4f}, weak {mean['weak']:.4f}, "
                f"semi {mean['semi']:.4f}"
            )
    scored = with_refiners[0][1]["pathologies_scored"]
    refined = [n for n in names if n != "none"]
    print("\nPseudo-label mIoU per pathology on test, mean over seeds [each seed's 95% CI]:\n")
    print("| pathology | none (tuned Grad-CAM) | " + " | ".join(refined) + " |")
    print("|---|---|" + "---|" * len(refined))
    ref_name = "Grad-CAM tuned (classifier saliency)"
    for t in scored:
        cells = []
        for n in ["none", *refined]:
            entries = [
                r["reference"][ref_name]["pathologies"][t]
                if n == "none"
                else r.get("refiner_details", {}).get(n, {}).get("pseudo", {}).get("pathologies", {}).get(t)
                for _, r in with_refiners
            ]
            if any(e is None for e in entries):
                cells.append("n/a")
                continue
            avg = statistics.mean((e["miou"] or 0.0) for e in entries)
            cis = ", ".join(f"{e['ci'][0]:.2f}-{e['ci'][1]:.2f}" if e["ci"][0] is not None else "-" for e in entries)
            cells.append(f"{avg:.3f} [{cis}]")
        print(f"| {t} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
