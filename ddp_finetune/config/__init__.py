"""The typed config: its sections, defaults and field docs (sections.py), YAML files, `@NAME` shipped configs
and `a.b=value` overrides (parsing.py). The public names are importable from here:

    from ddp_finetune.config import Config, load_config, dump_config
"""

from ddp_finetune.config.parsing import SHIPPED_PREFIX, config_source, flow_yaml, load_yaml, shipped_configs
from ddp_finetune.config.sections import (
    CheckpointConfig,
    Config,
    DataConfig,
    LogConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    config_from_dict,
    dump_config,
    load_config,
    reference_rows,
    reference_table,
    write_reference,
)

__all__ = [
    "SHIPPED_PREFIX",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "LogConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "config_from_dict",
    "config_source",
    "dump_config",
    "flow_yaml",
    "load_config",
    "load_yaml",
    "reference_rows",
    "reference_table",
    "shipped_configs",
    "write_reference",
]
