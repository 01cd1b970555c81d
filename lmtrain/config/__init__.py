"""Every configuration schema, registered in Hydra's ConfigStore, plus the cross-field checks.

YAML files under configs/ hold values only; the types, defaults and meanings live in this package, one
module per concern: model, data (and tokenizer), train (optimizer, scheduler, trainer), use (generate,
eval, export). Hydra checks each composed config against these schemas (unknown keys, wrong types, bad
enum values); `to_config` converts the result to plain dataclasses once, at the command's entry, and
runs the checks that involve more than one field.
"""

from hydra.core.config_store import ConfigStore

from lmtrain.config.base import CHECKS, as_plain_dict, check, check_device, to_config
from lmtrain.config.data import (
    DataConfig,
    EncodingErrors,
    MixtureSource,
    PrepareConfig,
    SourceConfig,
    SourceKind,
    TokenizerConfig,
    TokenizerKind,
    validate_data,
    validate_prepare,
    validate_tokenizer,
)
from lmtrain.config.model import Mlp, ModelConfig, Norm, PosEmb, RopeScaling, RopeScalingKind
from lmtrain.config.train import (
    DivergenceAction,
    EarlyStoppingConfig,
    FsdpDtype,
    MuonLrAdjust,
    OptimizerConfig,
    OptimizerName,
    Precision,
    SchedulerConfig,
    SchedulerName,
    Strategy,
    TrainConfig,
    TrainerConfig,
    to_train_config,
    validate,
)
from lmtrain.config.use import (
    EvalConfig,
    EvalSplit,
    ExportConfig,
    ExportFormat,
    GenerateConfig,
    validate_eval,
    validate_generate,
)

__all__ = [
    "CHECKS", "DataConfig", "DivergenceAction", "EarlyStoppingConfig", "EncodingErrors", "EvalConfig", "EvalSplit",
    "ExportConfig", "ExportFormat", "FsdpDtype", "GenerateConfig", "Mlp", "MixtureSource", "ModelConfig",
    "MuonLrAdjust", "Norm", "OptimizerConfig", "OptimizerName", "PosEmb", "Precision", "PrepareConfig", "RopeScaling",
    "RopeScalingKind", "SCHEMAS", "SchedulerConfig", "SchedulerName", "SourceConfig", "SourceKind", "Strategy",
    "TokenizerConfig",
    "TokenizerKind", "TrainConfig", "TrainerConfig", "as_plain_dict", "check", "check_device", "register_configs",
    "to_config", "to_train_config", "validate", "validate_data", "validate_eval", "validate_generate",
    "validate_prepare", "validate_tokenizer",
]


# Each command's top-level schema, by command name (`lmtrain train` -> TrainConfig).
SCHEMAS: dict[str, type] = {"train": TrainConfig, "prepare": PrepareConfig, "generate": GenerateConfig,
                            "eval": EvalConfig, "export": ExportConfig}


def register_configs(*commands: str) -> None:
    """Register these commands' top-level schemas (all, when none is named); each YAML lists its own first in its
    defaults. A command registers only its own: Hydra copies the whole ConfigStore for every config group it
    lists, so `lmtrain train --help` pays for each schema registered."""
    store = ConfigStore.instance()
    for command in commands or SCHEMAS:
        store.store(name=f"{command}_schema", node=SCHEMAS[command])
