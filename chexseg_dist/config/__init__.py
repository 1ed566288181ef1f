"""Typed configuration: one dataclass per component, a root :class:`Config`, presets as data, ``--set`` resolution.

Resolution order: dataclass defaults <- preset (``tiny`` or ``paper``) <- YAML file (``--config``) <- command-line
overrides (``--set section.field=value``). Components receive their own section (``cfg.masks``, ``cfg.pseudolabel``),
never the root config.
"""

from chexseg_dist.config.presets import PRESETS
from chexseg_dist.config.resolve import (
    CONFIG_FILENAME,
    from_dict,
    load_config,
    parse_value,
    read_config_file,
    save_config,
)
from chexseg_dist.config.sections import (
    ClassifierConfig,
    Config,
    EvaluateConfig,
    MasksConfig,
    PseudolabelConfig,
    SegmentationConfig,
    SegmentConfig,
    SynthConfig,
    TrainAffinityConfig,
    TrainClassifierConfig,
    TrainSegmentationConfig,
)

__all__ = [
    "CONFIG_FILENAME",
    "PRESETS",
    "ClassifierConfig",
    "Config",
    "EvaluateConfig",
    "MasksConfig",
    "PseudolabelConfig",
    "SegmentConfig",
    "SegmentationConfig",
    "SynthConfig",
    "TrainAffinityConfig",
    "TrainClassifierConfig",
    "TrainSegmentationConfig",
    "from_dict",
    "load_config",
    "parse_value",
    "read_config_file",
    "save_config",
]
