"""The lineage configuration: pydantic v2 models, loaded from YAML here and nowhere else.

Every field has a description and a default that works; unknown keys are errors. Each
stage function receives only the sub-config it needs. Defaults where the paper gives no
value (prior precision, sample count, rank, learning rate) are our choices, marked so.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.domain_format import GenerateScoring, MultipleChoiceScoring, PerplexityScoring, RowFormat, Scoring
from pipelines.errors import BadInput

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


class ConfigError(BadInput):
    """A configuration that cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))


# --- model ----------------------------------------------------------------------------
class TinyModelConfig(_Model):
    hidden_size: int = Field(64, gt=0, description="Width of the tiny Llama built when model.path is empty.")
    num_layers: int = Field(2, gt=0, description="Decoder layers of the tiny Llama.")
    num_heads: int = Field(4, gt=0, description="Attention heads (must divide hidden_size).")
    intermediate_size: int = Field(256, gt=0, description="MLP width of the tiny Llama.")
    max_positions: int = Field(64, gt=0, description="Maximum sequence length the tiny Llama supports.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        return self


class PretrainConfig(_Model):
    steps: int = Field(600, ge=0, description="Full-parameter training steps on the source domain for the tiny base.")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate for pretraining.")
    batch_size: int = Field(64, gt=0, description="Sequences per pretraining step.")
    extra_data: list[DomainConfig] = Field(default_factory=list, description="More data mixed into pretraining "
                                           "beside the source's training split (all of its rows, up to train_size; "
                                           "never scored). The demo gives the base a glimpse of each domain's task, "
                                           "as a pretrained LLM has seen a little of everything. Give generators a "
                                           "split_seed other than the domains' so the rows differ from theirs.")


class ModelConfig(_Model):
    path: str | None = Field(None, description="Hugging Face hub id or local directory of a causal LM and its "
                             "tokenizer (from_pretrained). Empty: build a tiny Llama and pretrain it on the source domain.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype when loading.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Shape of the tiny Llama (model.path empty).")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="Pretraining of the tiny Llama.")


# --- LoRA and LaLoRA --------------------------------------------------------------------
class LoraSettings(_Model):
    r: int = Field(8, gt=0, description="LoRA rank (our default; the paper's rank is not given).")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is (alpha / r) B A. Default 2r as in Biderman et al.")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout during fine-tuning (never during curvature).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, description="Module names that get LoRA matrices (peft target_modules).")
    init_seed: int = Field(0, description="Seed of the LoRA initialisation (the first stage's anchor).")


class DiagCurvatureConfig(_Model):
    kind: Literal["diag"] = "diag"
    fisher_type: Literal["empirical", "mc"] = Field("empirical", description="empirical: observed labels; mc: labels "
                                                    "sampled from the model (the 'true' Fisher).")
    mc_samples: int = Field(1, ge=1, description="Label draws per sequence for fisher_type mc.")


class KFACCurvatureConfig(_Model):
    kind: Literal["kfac"] = "kfac"
    fisher_type: Literal["empirical", "mc"] = Field("empirical", description="empirical: observed labels; mc: labels "
                                                    "sampled from the model.")
    mc_samples: int = Field(1, ge=1, description="Label draws per sequence for fisher_type mc.")
    top_k: int = Field(32, ge=1, description="Eigenpairs kept of each large (d x d) factor, plus its diagonal (our default).")
    max_terms: int = Field(4, ge=1, description="Kronecker terms kept per matrix across domains before the two oldest "
                           "merge into their nearest Kronecker product.")


class KFACTriCurvatureConfig(KFACCurvatureConfig):
    kind: Literal["kfac-tri"] = "kfac-tri"  # type: ignore[assignment]


class IdentityCurvatureConfig(_Model):
    kind: Literal["identity"] = "identity"


CurvatureConfig = Annotated[DiagCurvatureConfig | KFACCurvatureConfig | KFACTriCurvatureConfig | IdentityCurvatureConfig,
                            Field(discriminator="kind")]


class PriorConfig(_Model):
    tau_A: float = Field(1.0, ge=0, description="Prior precision of A matrices. At the first anchor (B = 0) A has zero "
                         "curvature, so this alone holds A; our default, not the paper's.")
    tau_B: float = Field(1e-4, ge=0, description="Prior precision of B matrices (our default).")


class AccumulationConfig(_Model):
    mode: Literal["sum", "online", "replace"] = Field("sum", description="sum: recursive Laplace; online: gamma-decayed "
                                                      "(online EWC); replace: newest domain only.")
    gamma: float = Field(1.0, ge=0, le=1, description="Decay of earlier domains' curvature for mode online.")


class LaLoRAConfig(_Model):
    lam: float = Field(10.0, alias="lambda", ge=0, description="Penalty strength lambda; 0 is plain LoRA.")
    curvature: CurvatureConfig = Field(default_factory=DiagCurvatureConfig, description="Curvature structure, by kind.")
    samples: int = Field(256, gt=0, description="Curvature sequences per domain, N_s (our default; small proxy sets suffice).")
    batch_size: int = Field(32, gt=0, description="Sequences per curvature batch.")
    prior: PriorConfig = Field(default_factory=PriorConfig, description="Prior precision tau per matrix kind.")
    accumulate: AccumulationConfig = Field(default_factory=AccumulationConfig, description="How domains' curvature combines.")
    memory_budget_gb: float = Field(8.0, gt=0, description="Refuse a curvature pass whose accumulators would exceed this "
                                    "many GiB (estimated and printed before the pass).")


# --- data -------------------------------------------------------------------------------
SymbolOp = Literal["copy", "reverse", "next", "previous", "rotate", "double", "increment"]


class GeneratorSource(_Model):
    kind: Literal["generator"] = "generator"
    name: Literal["symbol-ops"] = Field("symbol-ops", description="Built-in generator.")
    op: SymbolOp | list[SymbolOp] = Field("copy", description="Transformation of the symbol string; a list "
                                          "mixes several, each example drawing one at random.")
    alphabet: str = Field("0123456789", min_length=2, description="Symbols the strings are drawn from.")
    min_len: int = Field(3, ge=1, description="Shortest string.")
    max_len: int = Field(5, ge=1, description="Longest string.")
    size: int = Field(3000, gt=0, description="Examples generated (before the splits).")

    @model_validator(mode="after")
    def _lengths(self) -> GeneratorSource:
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) must be <= max_len ({self.max_len})")
        ops = self.op if isinstance(self.op, list) else [self.op]
        if {"double", "increment"} & set(ops) and not set(self.alphabet) <= set("0123456789"):
            raise ValueError(f"ops double and increment need a digit alphabet, got {self.alphabet!r}")
        return self


class LocalSource(_Model):
    kind: Literal["local"] = "local"
    path: str = Field(description="A JSONL, JSON, CSV or Parquet file, relative to the config file or absolute.")
    split: str = Field("train", description="Split name datasets gives the file.")


class HubSource(_Model):
    kind: Literal["hub"] = "hub"
    id: str = Field(description="Dataset id on the Hugging Face hub (or a local dataset directory).")
    name: str | None = Field(None, description="Dataset config name.")
    split: str = Field("train", description="Split to load.")


DataSource = Annotated[GeneratorSource | LocalSource | HubSource, Field(discriminator="kind")]


class EvalDataConfig(RowFormat):
    """A separate source of a domain's evaluation rows (a test split, or another dataset of the same task)."""

    data: DataSource = Field(description="Where the evaluation examples come from.")


class DomainConfig(RowFormat):
    name: str = Field(description="Domain name: letters, digits, '.', '_' or '-'; used in paths, runs and tags.")
    data: DataSource = Field(default_factory=GeneratorSource, description="Where the examples come from.")
    eval_data: EvalDataConfig | None = Field(None, description="Evaluation rows from another source and format (e.g. "
                                             "train on MetaMathQA, score on GSM8K test); default: held out from data.")
    eval_size: int = Field(200, gt=0, description="Held-out examples scored after every stage (at most this many for "
                           "eval_data and for probes).")
    train_size: int | None = Field(None, gt=0, description="Cap on training examples (after the shuffle); default all.")
    curvature_size: int | None = Field(None, gt=0, description="Examples for this domain's curvature; default lalora.samples.")
    scoring: Scoring | None = Field(None, description="Score of the R matrix, by kind: generate, multiple_choice or "
                                    "perplexity. Default: the preset's (generate with extractor exact without one).")
    chat_template: Literal["never", "auto", "always"] = Field("never", description="Wrap each prompt as a user turn "
                                                              "in the tokenizer's chat template: auto when it has one; "
                                                              "always fails if it has none.")
    split_seed: int = Field(0, description="Seed of the generator (built-in data) and of the shuffle fixing the train / eval / curvature splits.")

    @model_validator(mode="after")
    def _scoring_fits(self) -> DomainConfig:
        if self.score.kind == "multiple_choice" and not self.eval_format.has_choices:
            raise ValueError("scoring multiple_choice needs choices: use preset hellaswag, arc or winogrande, or set "
                             "choices_field and label_field" + (" on eval_data" if self.eval_data else ""))
        return self

    @property
    def eval_format(self) -> RowFormat:
        """The format of the evaluation rows."""
        return self.eval_data if self.eval_data is not None else self

    @property
    def score(self) -> GenerateScoring | MultipleChoiceScoring | PerplexityScoring:
        """The scorer in effect: ``scoring`` or the evaluation format's default."""
        return self.scoring if self.scoring is not None else self.eval_format.default_scoring()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} is not a valid domain name (letters, digits, '.', '_', '-'; up to 64)")
        return v


PretrainConfig.model_rebuild()
ModelConfig.model_rebuild()


# --- training, engine, evaluation, tracking ----------------------------------------------
class TrainingConfig(_Model):
    steps: int = Field(300, gt=0, description="Optimizer steps per stage.")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate of the LoRA matrices (our default).")
    batch_size: int = Field(64, gt=0, description="Sequences per step.")
    max_length: int = Field(32, gt=1, description="Longest training sequence in tokens; longer ones are truncated "
                            "or refused (overlong).")
    overlong: Literal["truncate", "error"] = Field("truncate", description="A training sequence longer than "
                                                   "max_length: truncate it, or stop the run naming the example.")
    seed: int = Field(0, description="Seed of data order and dropout.")
    log_every: int = Field(10, gt=0, description="Steps between logged loss / penalty values.")
    checkpoint_every: int = Field(50, ge=0, description="Steps between DeepSpeed checkpoints of the adapter and "
                                  "optimizer; an interrupted stage restarts from the latest one (0: only at the end).")
    group_by_length: bool = Field(False, description="Batch examples of similar length together (less padding; "
                                  "batch order stays shuffled).")


class DeepSpeedConfig(_Model):
    zero_stage: Literal[0, 1, 2] = Field(0, description="ZeRO stage. Stage 3 partitions the LoRA matrices, which the "
                                         "Laplace penalty needs whole, so it is not offered.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Training precision inside the engine.")
    gradient_clipping: float = Field(1.0, ge=0, description="Global gradient-norm clip (0: off).")
    world_size: int = Field(1, ge=1, description="Processes per node for fine-tuning and curvature; above 1 (or with "
                            "a hostfile) both steps run through the deepspeed launcher, data parallel.")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile for multi-node runs ('host slots=N' lines); "
                                 "relative to the config file or absolute.")

    @field_validator("zero_stage", mode="before")
    @classmethod
    def _no_stage3(cls, v: Any) -> Any:
        if v == 3:
            raise ValueError("zero_stage 3 partitions the LoRA parameters, which the Laplace penalty needs whole; use 0, 1 or 2")
        return v


class EvaluationConfig(_Model):
    batch_size: int = Field(200, gt=0, description="Prompts per generation batch.")
    max_new_tokens: int = Field(12, gt=0, description="Greedy generation length limit.")


class TrackingConfig(_Model):
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; empty: sqlite:///<out>/mlflow.db.")
    experiment: str = Field("lalora", min_length=1, description="MLflow experiment name.")
    registered_model: str = Field("lalora-adapter", min_length=1, description="Registered model holding one version per stage.")
    latest_alias: str = Field("newest", min_length=1, description="Alias moved to every new version. MLflow reserves "
                              "'latest' (models:/NAME/latest already means the newest version), so it cannot be used.")

    @field_validator("registered_model")
    @classmethod
    def _safe_model_name(cls, v: str) -> str:
        if not _NAME.match(v):  # it also names directories (forks), so it may not hold '/' or '..'
            raise ValueError(f"{v!r} is not a valid registered model name (letters, digits, '.', '_', '-'; up to 64)")
        return v

    @field_validator("mlflow_uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v and urlsplit(v).password is not None:
            raise ValueError("holds a password; secrets come only from the environment: drop it from the URI and "
                             "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
        return v

    @field_validator("latest_alias")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v.lower() == "latest" or re.fullmatch(r"[vV]\d+", v):
            raise ValueError(f"alias {v!r} is reserved by MLflow; choose another (default 'newest')")
        return v


class PromotionConfig(_Model):
    alias: str = Field("champion", min_length=1, description="Alias that moves to a new version only when every "
                       "condition below holds; a version that fails stays registered, tagged with the reason.")
    min_bwt: float | None = Field(None, description="Backward transfer after the stage must be >= this (e.g. -0.05); "
                                  "empty: not checked.")
    max_forgetting: float | None = Field(None, ge=0, description="No earlier domain (source and probes included) "
                                         "may have forgotten more than this, in its own score's units (accuracy: "
                                         "0..1; a perplexity-scored domain: its NLL); empty: not checked.")
    min_learning: float | None = Field(None, description="The stage's own domain must gain at least this "
                                       "(R[t][t] - R[t-1][t], sign flipped for a lower-is-better score); empty: "
                                       "not checked.")


class OrchestrationConfig(_Model):
    finetune_retries: int = Field(1, ge=0, description="Prefect retries of the fine-tune task; a retry resumes "
                                  "from the stage's latest DeepSpeed checkpoint.")
    retry_delay_seconds: float = Field(5.0, ge=0, description="Wait before a retry.")
    lease_ttl_seconds: float = Field(120.0, gt=0, description="Workers on several hosts sharing one tracking "
                                     "server write a lineage one at a time, under a lease kept in the store; a "
                                     "holder heartbeats every quarter of this, and a lease whose last heartbeat is "
                                     "older is taken over (its holder died).")


class RuntimeConfig(_Model):
    threads: int | None = Field(None, ge=1, description="torch threads for every step (pretraining, curvature, "
                                "fine-tuning, scoring); empty: torch's default (the machine's cores, or "
                                "OMP_NUM_THREADS). On a CPU the thread count changes the order of floating-point "
                                "sums, so pin it for results that do not depend on the machine. Not part of a "
                                "stage's identity (like deepspeed.world_size).")


class LineageConfig(_Model):
    name: str = Field("lineage", description="Lineage name (MLflow run name, tags).")
    seed: int = Field(0, description="Global seed (model init, pretraining).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter shape.")
    lalora: LaLoRAConfig = Field(default_factory=LaLoRAConfig, description="The Laplace penalty.")
    source: DomainConfig = Field(default_factory=lambda: DomainConfig(name="source"), description="What the base "
                                 "model knows: curvature data of the first stage and a forgetting probe; pretraining "
                                 "data of the tiny base.")
    domains: list[DomainConfig] = Field(min_length=1, description="New domains, one stage each, in order.")
    probes: list[DomainConfig] = Field(default_factory=list, description="Evaluation-only domains (benchmarks of what "
                                       "the base model knows, e.g. HellaSwag): scored after every stage as extra "
                                       "columns of R, never trained on or used for curvature.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Fine-tuning per stage.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="The DeepSpeed engine.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Scoring after every stage.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking and registry.")
    promotion: PromotionConfig = Field(default_factory=PromotionConfig, description="Gate on the champion alias.")
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig, description="Prefect retries.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Compute resources of this process.")
    catalogue: str | None = Field(None, description="YAML file listing further domains (a list, or a mapping with "
                                  "'domains'), appended after 'domains' and re-read on every run, so a scheduled run "
                                  "picks up new ones. Relative to the config file or absolute.")

    @model_validator(mode="after")
    def _world_divides_batch(self) -> LineageConfig:
        if self.training.batch_size % self.deepspeed.world_size:
            raise ValueError(f"training.batch_size ({self.training.batch_size}) must be divisible by "
                             f"deepspeed.world_size ({self.deepspeed.world_size})")
        return self

    @model_validator(mode="after")
    def _unique_domains(self) -> LineageConfig:
        names = [d.name for d in self.eval_domains]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"domain names must be unique (source included); repeated: {', '.join(dup)}")
        extra = [d.name for d in self.model.pretrain.extra_data]  # each name is a data file under data/
        dup = sorted({n for n in extra if extra.count(n) > 1 or n in names})
        if dup:
            raise ValueError(f"model.pretrain.extra_data names must differ from each other and from the domains' "
                             f"(they name data files); rename: {', '.join(dup)}")
        return self

    @property
    def all_domains(self) -> list[DomainConfig]:
        """Source first, then the stages' domains: the columns of R."""
        return [self.source, *self.domains]

    @property
    def eval_domains(self) -> list[DomainConfig]:
        """Every scored domain: ``all_domains`` then the probes."""
        return [*self.all_domains, *self.probes]


# --- loading ----------------------------------------------------------------------------
def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError("--set", [f"{dotted}: {'.'.join(keys[:i + 1])} is not an index of a list of {len(node)}"])
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError("--set", [f"{dotted}: {'.'.join(keys[:i + 1])} is a value, not a section"])
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError("--set", [f"{dotted}: {last} is not an index of a list of {len(node)}"])
        node[int(last)] = value
    else:
        node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", [f"{text!r}: expected KEY=VALUE, e.g. --set lalora.lambda=0"])
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError("--set", [f"{text!r}: value is not valid YAML ({e.__class__.__name__})"]) from None


def _format_errors(e: ValidationError) -> list[str]:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see the config reference in README)"
        elif err["type"] == "literal_error" and "expected" in err.get("ctx", {}):
            msg = f"must be one of {err['ctx']['expected']}"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown kind {err['ctx'].get('tag')!r}; expected one of {err['ctx'].get('expected_tags')}"
        lines.append(f"{loc}: {msg}")
    return lines


def load_config(path: str | Path, overrides: list[str] | None = None) -> LineageConfig:
    """Read YAML, apply ``--set`` overrides, validate. Raises ConfigError listing every problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(path), ["file not found"])
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(str(path), [f"invalid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["top level must be a mapping of sections (model, lora, lalora, domains, ...)"])
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(data, key, value)
    _resolve_local_paths(data, p.parent)
    if isinstance(data.get("catalogue"), str):
        _append_catalogue(data, p.parent)
    if isinstance(data.get("deepspeed"), dict) and isinstance(data["deepspeed"].get("hostfile"), str):
        data["deepspeed"]["hostfile"] = str((p.parent / data["deepspeed"]["hostfile"]).resolve())
    try:
        return LineageConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(str(path), _format_errors(e)) from None


def _append_catalogue(data: dict[str, Any], base: Path) -> None:
    """Domains listed in the catalogue file join the config's own, after them."""
    path = (base / data["catalogue"]).resolve()
    data["catalogue"] = str(path)
    if not path.is_file():
        raise ConfigError(str(path), ["catalogue file not found"])
    try:
        listed = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [f"invalid YAML: {getattr(e, 'problem', e)}"]) from None
    if isinstance(listed, dict):
        listed = listed.get("domains") or []
    if not isinstance(listed, list):
        raise ConfigError(str(path), ["a catalogue is a list of domains or a mapping with 'domains'"])
    extra = {"domains": listed}
    _resolve_local_paths(extra, path.parent)
    data["domains"] = list(data.get("domains") or []) + extra["domains"]


def _resolve_local_paths(data: dict[str, Any], base: Path) -> None:
    """Local data files are relative to the config file."""
    pretrain = ((data.get("model") or {}).get("pretrain") or {}) if isinstance(data.get("model"), dict) else {}
    extra = (pretrain.get("extra_data") or []) if isinstance(pretrain, dict) else []
    domains = [data.get("source")] + list(data.get("domains") or []) + list(data.get("probes") or []) + list(extra)
    for d in domains:
        if not isinstance(d, dict):
            continue
        for src in (d.get("data"), (d.get("eval_data") or {}).get("data") if isinstance(d.get("eval_data"), dict) else None):
            if isinstance(src, dict) and src.get("kind") == "local" and isinstance(src.get("path"), str):
                if not Path(src["path"]).is_absolute():
                    src["path"] = str((base / src["path"]).resolve())
