"""The one definition of the pathologies: CheXlocalize's 10 localisation tasks and CheXpert's 14 observations.

Every other module imports these names; nothing else spells a pathology list out.
"""

from __future__ import annotations

from chexseg_dist.errors import InputError


class UnknownPathologyError(InputError, KeyError):
    """A pathology name that is neither a CheXlocalize task nor its CheXpert alias."""


#: CheXpert's 14 observations, in the order of the CheXpert CSV columns. The classifier predicts these.
OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

#: CheXlocalize's 10 localisation tasks, canonical (CheXlocalize) spelling, in benchmark order. Segmentation
#: outputs, pseudo-masks and evaluation use this order.
TASKS: tuple[str, ...] = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Airspace Opacity",
    "Edema",
    "Consolidation",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Support Devices",
)

#: CheXpert's CSV spells "Airspace Opacity" as "Lung Opacity". Maps CheXpert spelling -> CheXlocalize spelling.
TASK_ALIASES: dict[str, str] = {"Lung Opacity": "Airspace Opacity"}

#: The exact CheXpert CSV header (train.csv / valid.csv).
CSV_META_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
CSV_HEADER: tuple[str, ...] = CSV_META_COLUMNS + OBSERVATIONS


def canonical_task(name: str) -> str:
    """Return the CheXlocalize spelling of a localisation task, accepting the CheXpert alias.

    Raises:
        UnknownPathologyError: naming the unknown pathology and the accepted names.
    """
    name = TASK_ALIASES.get(name, name)
    if name not in TASKS:
        raise UnknownPathologyError(f"unknown pathology {name!r}; expected one of {list(TASKS)} (or 'Lung Opacity')")
    return name


def observation_for_task(task: str) -> str:
    """The CheXpert observation (CSV column) that carries the image-level label of a localisation task."""
    task = canonical_task(task)
    for chexpert_name, chexlocalize_name in TASK_ALIASES.items():
        if chexlocalize_name == task:
            return chexpert_name
    return task


#: How many observations (classifier outputs) and localisation tasks (segmentation outputs, map channels) there are.
N_OBSERVATIONS = len(OBSERVATIONS)
N_TASKS = len(TASKS)

#: For each of the 10 tasks, its index among the 14 observations (the classifier's output order).
TASK_OBSERVATION_INDEX: tuple[int, ...] = tuple(OBSERVATIONS.index(observation_for_task(t)) for t in TASKS)
