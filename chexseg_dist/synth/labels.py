"""The label model: which findings a study shows, and the CheXpert label cells reported for them.

Labels come from a small latent model (normal study, ICU/portable, heart failure, infection) tuned to CheXpert's
train prevalences. In train, negatives are mostly blank (not mentioned) or sometimes 0.0, and uncertain (-1.0)
labels mark a mix of faint present findings and absent ones; valid and test labels are certain (0/1). The cells
are derived after rendering from what was actually drawn (see :func:`label_cells`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from chexseg_dist.core.pathologies import CSV_HEADER, OBSERVATIONS

# Study.present keys drawn findings by CheXpert observation; "_patchy" is Airspace Opacity's own patches.
PATCHY = "_patchy"


@dataclass
class Study:
    """What one study shows: drawn findings with their conspicuity, the view, and (after rendering) labels.

    Attributes:
        present: finding -> conspicuity in (0, 1] (CheXpert observation names, plus ``"_patchy"``).
        ap: anteroposterior (portable) view, else posteroanterior.
        labels: observation -> CSV cell ("1.0", "0.0", "-1.0" or ""); filled by :func:`label_cells`.
    """

    present: dict[str, float]
    ap: bool
    labels: dict[str, str] = field(default_factory=dict)


def _conspicuity(rng: np.random.Generator) -> float:
    # Near-uniform on (0, 1): ~16% of instances below 0.2, which are drawn at noise-level contrast.
    return float(np.clip(rng.beta(1.2, 1.1), 0.02, 1.0))


def sample_study(rng: np.random.Generator) -> Study:
    """Draw which findings a study shows from a small latent model tuned to CheXpert's train prevalences.

    Latents: a fully normal study (5%; ~10% of studies end up with nothing drawn), an ICU/portable setting
    (devices, effusions, pneumothorax), heart failure (cardiomegaly, oedema, effusion) and infection
    (consolidation, patchy opacity, pneumonia).

    Args:
        rng: the study's generator.

    Returns:
        The study with ``present`` and ``ap`` set and ``labels`` still empty.
    """
    present: dict[str, float] = {}

    def maybe(name: str, p: float) -> None:
        if rng.random() < p:
            present[name] = _conspicuity(rng)

    if rng.random() < 0.05:
        return Study(present={}, ap=bool(rng.random() < 0.3))
    icu = bool(rng.random() < 0.62)
    chf = bool(rng.random() < (0.36 if icu else 0.16))
    infection = bool(rng.random() < (0.22 if icu else 0.14))
    maybe("Support Devices", 0.84 if icu else 0.2)
    maybe("Cardiomegaly", 0.4 if chf else 0.07)
    maybe("Edema", 0.72 if chf else 0.1)
    maybe("Enlarged Cardiomediastinum", 0.2 if "Cardiomegaly" in present else 0.06)
    maybe("Pleural Effusion", 0.29 + 0.33 * chf + 0.15 * icu)
    maybe("Atelectasis", 0.14 + 0.12 * ("Pleural Effusion" in present))
    maybe("Consolidation", 0.33 if infection else 0.02)
    maybe("Pneumonia", (0.42 if "Consolidation" in present else 0.2) if infection else 0.008)
    maybe(PATCHY, 0.6 if infection else 0.15)
    maybe("Pneumothorax", 0.15 if icu else 0.065)
    maybe("Lung Lesion", 0.055)
    maybe("Fracture", 0.045 + 0.08 * ("Pneumothorax" in present))
    maybe("Pleural Other", 0.02)
    ap = bool(rng.random() < (0.97 if icu else 0.5))
    return Study(present=present, ap=ap)


# Train-label noise per observation: P(-1.0 | absent), P(0.0 | absent); the rest of the absent cases are blank.
_UNCERTAIN_ABSENT = {
    "Enlarged Cardiomediastinum": 0.025, "Cardiomegaly": 0.015, "Lung Opacity": 0.015, "Lung Lesion": 0.004,
    "Edema": 0.02, "Consolidation": 0.05, "Pneumonia": 0.045, "Atelectasis": 0.06, "Pneumothorax": 0.01,
    "Pleural Effusion": 0.03, "Pleural Other": 0.01, "Fracture": 0.003, "Support Devices": 0.004,
}  # fmt: skip
_ZERO_ABSENT = {
    "Enlarged Cardiomediastinum": 0.1, "Cardiomegaly": 0.05, "Lung Opacity": 0.03, "Lung Lesion": 0.01,
    "Edema": 0.1, "Consolidation": 0.13, "Pneumonia": 0.02, "Atelectasis": 0.01, "Pneumothorax": 0.26,
    "Pleural Effusion": 0.16, "Pleural Other": 0.01, "Fracture": 0.01, "Support Devices": 0.03,
}  # fmt: skip


def label_cells(rng: np.random.Generator, present: dict[str, float], certain: bool) -> dict[str, str]:
    """CSV cells of the 14 observations from what was actually drawn.

    ``certain`` (valid/test): 1.0 / 0.0 exactly. Otherwise (train) report-like noise: a faint finding is often
    uncertain or unmentioned, an absent one mostly unmentioned, sometimes negated or uncertain. Never 1.0 for an
    absent finding.

    Args:
        rng: the study's generator (one draw per observation in train, none when ``certain``).
        present: drawn finding -> conspicuity, after empty masks were dropped (CheXpert observation names).
        certain: valid/test labels (0/1) instead of train-like cells.

    Returns:
        Observation -> CSV cell ("1.0", "0.0", "-1.0" or ""), in ``OBSERVATIONS`` order.
    """
    cells: dict[str, str] = {}
    for obs in OBSERVATIONS[1:]:
        c = present.get(obs)
        if certain:
            cells[obs] = "1.0" if c is not None else "0.0"
            continue
        r = rng.random()
        if c is not None:
            if c < 0.35:
                pu = 0.05 if obs == "Support Devices" else 0.45  # devices are seldom reported as uncertain
                cells[obs] = "-1.0" if r < pu else ("" if r < pu + 0.1 else "1.0")
            else:
                cells[obs] = "-1.0" if r < 0.04 else ("" if r < 0.06 else "1.0")
        else:
            pu, pz = _UNCERTAIN_ABSENT[obs], _ZERO_ABSENT[obs]
            cells[obs] = "-1.0" if r < pu else ("0.0" if r < pu + pz else "")
    anything = any(v in ("1.0", "-1.0") for v in cells.values()) or bool(present)
    if certain:
        cells["No Finding"] = "0.0" if present else "1.0"
    else:
        cells["No Finding"] = "" if anything else "1.0"
    return {obs: cells[obs] for obs in OBSERVATIONS}


def label_prevalence(rows: list[list[str]]) -> dict[str, dict[str, float]]:
    """Share of CSV rows whose cell is positive, negative, uncertain or blank, per observation.

    Args:
        rows: CSV rows laid out as ``CSV_HEADER`` (the observation cells last).

    Returns:
        Observation -> {"positive", "negative", "uncertain", "blank"} -> share rounded to 4 places (0 if no rows).
    """
    n = max(1, len(rows))
    out: dict[str, dict[str, float]] = {}
    for j, obs in enumerate(OBSERVATIONS):
        cells = [r[len(CSV_HEADER) - len(OBSERVATIONS) + j] for r in rows]
        out[obs] = {
            name: round(sum(c == cell for c in cells) / n, 4)
            for name, cell in (("positive", "1.0"), ("negative", "0.0"), ("uncertain", "-1.0"), ("blank", ""))
        }
    return out
