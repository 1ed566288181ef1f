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
    print("\n| seed | total s | classifier s | pseudo-labelling s | students s (train) | segment + evaluate s |")
    print("|---|---|---|---|---|---|")
    for path, run in runs:
        st = run["stage_seconds"]
        parts = [_total(st, "classifier"), _total(st, "pseudo-label"), _total(st, ": train ")]
        parts.append(_total(st, "segment") + _total(st, "evaluate"))
        print(f"| {_seed(run, path)} | {run['total_seconds']:.0f} | " + " | ".join(f"{v:.0f}" for v in parts) + " |")


if __name__ == "__main__":
    main()
