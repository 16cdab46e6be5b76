"""The lineage configuration: pydantic v2 models (``schema``, ``domains``), loaded from YAML in exactly one
place (``load``). Every name a stage or flow needs is here."""

from pipelines.config.base import ConfigError
from pipelines.config.domains import (
    DataSource,
    DomainConfig,
    EvalDataConfig,
    GeneratorSource,
    HubSource,
    LocalSource,
    SymbolOp,
)
from pipelines.config.load import config_schema, format_errors, load_config, parse_override, set_path
from pipelines.config.schema import (
    CURVATURE_CONFIGS,
    AccumulationConfig,
    AutoLambdaConfig,
    CurvatureConfig,
    DeepSpeedConfig,
    EvaluationConfig,
    LaLoRAConfig,
    LineageConfig,
    LoraSettings,
    ModelConfig,
    OrchestrationConfig,
    PretrainConfig,
    PriorConfig,
    PromotionConfig,
    ReplayConfig,
    RuntimeConfig,
    TinyModelConfig,
    TrackingConfig,
    TrainingConfig,
)

__all__ = ["CURVATURE_CONFIGS", "AccumulationConfig", "AutoLambdaConfig", "ConfigError", "CurvatureConfig",
           "DataSource", "DeepSpeedConfig", "DomainConfig", "EvalDataConfig", "EvaluationConfig", "GeneratorSource",
           "HubSource", "LaLoRAConfig", "LineageConfig", "LocalSource", "LoraSettings", "ModelConfig",
           "OrchestrationConfig", "PretrainConfig", "PriorConfig", "PromotionConfig", "ReplayConfig", "RuntimeConfig",
           "SymbolOp", "TinyModelConfig", "TrackingConfig", "TrainingConfig", "config_schema", "format_errors",
           "load_config", "parse_override", "set_path"]
