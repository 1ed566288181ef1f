"""Time ``chexseg manifest --csv`` on a CheXpert-train-sized CSV (223,414 rows, ~191k frontal).

Generates a realistic CheXpert-format CSV into a temporary directory (real-release path layout
``CheXpert-v1.0-small/train/patientNNNNN/studyN/viewN_{frontal,lateral}.jpg``, labels 1.0 / 0.0 / -1.0 / blank,
sex, age with a few blanks, AP/PA), then runs the whole command (read, validate, remap, write Parquet) in-process
and reports the best of ``--repeats`` runs. No image is opened.

    .venv/bin/python benchmarks/bench_manifest.py [--rows 223414] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from chexseg_dist.cli.main import main as chexseg
from chexseg_dist.core.pathologies import CSV_HEADER, OBSERVATIONS
from chexseg_dist.data.manifest import read_manifest


def make_csv(path: str, rows: int, seed: int = 0) -> int:
    """Write a CheXpert-format CSV with ``rows`` data lines; returns the number of frontal rows."""
    rng = np.random.default_rng(seed)
    lines = [",".join(CSV_HEADER)]
    # Label cells: mostly blank, as in CheXpert train (uncertain -1.0 present in every column).
    cells = np.array(["", "1.0", "0.0", "-1.0"])
    label_idx = rng.choice(4, size=(rows, len(OBSERVATIONS)), p=[0.70, 0.15, 0.08, 0.07])
    sexes = rng.choice(np.array(["Male", "Female", "Unknown"]), size=rows, p=[0.59, 0.409, 0.001])
    ages = rng.integers(18, 91, size=rows).astype(str)
    ages[rng.random(rows) < 0.001] = ""
    frontal_count = 0
    patient, r = 0, 0
    while r < rows:
        patient += 1
        for study in range(1, int(rng.geometric(0.35)) + 1):
            # ~85.5% frontal overall: one frontal, sometimes a second frontal, a lateral about 1 in 6 studies.
            views = (
                ["frontal"]
                + (["frontal"] if rng.random() < 0.02 else [])
                + (["lateral"] if rng.random() < 0.17 else [])
            )
            for v, kind in enumerate(views, start=1):
                if r >= rows:
                    break
                frontal = kind == "frontal"
                frontal_count += frontal
                ap_pa = ("AP" if rng.random() < 0.85 else "PA") if frontal else ""
                labels = ",".join(cells[label_idx[r]])
                lines.append(
                    f"CheXpert-v1.0-small/train/patient{patient:05d}/study{study}/view{v}_{kind}.jpg,"
                    f"{sexes[r]},{ages[r]},{'Frontal' if frontal else 'Lateral'},{ap_pa},{labels}"
                )
                r += 1
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return frontal_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=223_414)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = os.path.join(tmp, "CheXpert-v1.0-small", "train.csv")
        os.makedirs(os.path.dirname(csv_path))
        t0 = time.perf_counter()
        frontal = make_csv(csv_path, args.rows)
        size_mb = os.path.getsize(csv_path) / 1e6
        print(f"generated {args.rows} rows ({frontal} frontal, {size_mb:.1f} MB) in {time.perf_counter() - t0:.1f} s")
        out = os.path.join(tmp, "train.parquet")
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            rc = chexseg(["manifest", "--csv", csv_path, "--out", out])
            times.append(time.perf_counter() - t0)
            assert rc == 0, rc
        table = read_manifest(out)
        assert table.num_rows == args.rows
        best = min(times)
        print(
            f"manifest: best of {args.repeats}: {best:.2f} s, {args.rows / best:,.0f} rows/s "
            f"(all runs: {', '.join(f'{t:.2f}' for t in times)} s; parquet {os.path.getsize(out) / 1e6:.1f} MB)"
        )


if __name__ == "__main__":
    main()
