"""The lineage configuration's models (pydantic v2). Every field has a description and a default that works;
unknown keys are errors. Each stage function receives only the sub-config it needs. Defaults where the
paper gives no value (prior precision, sample count, rank, learning rate) are our choices, marked so.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from lalora.curvature.settings import SETTINGS, FisherType
from pipelines.config.base import NAME, NOT_IDENTITY, Lambda, Model
from pipelines.config.domains import SAMPLES, VAL_SIZE, DomainConfig


# --- model ----------------------------------------------------------------------------
class TinyModelConfig(Model):
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


class PretrainConfig(Model):
    steps: int = Field(600, ge=0, description="Full-parameter training steps on the source domain for the tiny base.")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate for pretraining.")
    batch_size: int = Field(64, gt=0, description="Sequences per pretraining step.")
    extra_data: list[DomainConfig] = Field(
        default_factory=list,
        description="More data mixed into pretraining "
        "beside the source's training split (all of its rows, up to train_size; "
        "never scored). The demo gives the base a glimpse of each domain's task, "
        "as a pretrained LLM has seen a little of everything. Give generators a "
        "split_seed other than the domains' so the rows differ from theirs.",
    )


class ModelConfig(Model):
    path: str | None = Field(
        None,
        description="Hugging Face hub id or local directory of a causal LM and its "
        "tokenizer (from_pretrained); a local directory is relative to the config file. Empty: "
        "build a tiny Llama and pretrain it on the source domain.",
    )
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of the local model's "
        "model.safetensors (what sha256sum prints): a run stops before training when the file "
        "differs. Set, it identifies the base in the stages' identity instead of the path, "
        "so a lineage resumes from another checkout. `lalora base` prints it.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype when loading.")
    tiny: TinyModelConfig = Field(
        default_factory=TinyModelConfig, description="Shape of the tiny Llama (model.path empty)."
    )
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="Pretraining of the tiny Llama.")


# --- LoRA and LaLoRA --------------------------------------------------------------------
class LoraSettings(Model):
    r: int = Field(8, gt=0, description="LoRA rank (our default; the paper's rank is not given).")
    alpha: float = Field(
        16.0, gt=0, description="LoRA alpha; the update is (alpha / r) B A. Default 2r as in Biderman et al."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout during fine-tuning (never during curvature).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module names that get LoRA matrices (peft target_modules).",
    )
    init_seed: int = Field(0, description="Seed of the LoRA initialisation (the first stage's anchor).")


def _setting(kind: str, name: str) -> Any:
    """The field ``name`` of curvature ``kind``'s section: its default, description and bounds as the estimator
    declares them (its settings dataclass in lalora.curvature.settings, which imports no torch)."""
    f = next(f for f in dataclasses.fields(SETTINGS[kind]) if f.name == name)
    bounds = {k: f.metadata[k] for k in ("ge", "gt", "le") if k in f.metadata}
    return Field(f.default, description=f.metadata.get("doc", ""), **bounds)


# One section per registered curvature kind, its fields those of the estimator's settings (names and types here,
# checked against the settings by tests/pipelines/test_config.py; defaults, descriptions and bounds read from them).
class DiagCurvatureConfig(Model):
    """lalora.curvature with kind 'diag'."""

    kind: Literal["diag"] = "diag"
    fisher_type: FisherType = _setting("diag", "fisher_type")
    mc_samples: int = _setting("diag", "mc_samples")


class KfacCurvatureConfig(Model):
    """lalora.curvature with kind 'kfac'."""

    kind: Literal["kfac"] = "kfac"
    fisher_type: FisherType = _setting("kfac", "fisher_type")
    mc_samples: int = _setting("kfac", "mc_samples")
    top_k: int = _setting("kfac", "top_k")
    max_terms: int = _setting("kfac", "max_terms")


class KfacTriCurvatureConfig(Model):
    """lalora.curvature with kind 'kfac-tri'."""

    kind: Literal["kfac-tri"] = "kfac-tri"
    fisher_type: FisherType = _setting("kfac-tri", "fisher_type")
    mc_samples: int = _setting("kfac-tri", "mc_samples")
    top_k: int = _setting("kfac-tri", "top_k")
    max_terms: int = _setting("kfac-tri", "max_terms")


class IdentityCurvatureConfig(Model):
    """lalora.curvature with kind 'identity'."""

    kind: Literal["identity"] = "identity"


CurvatureConfig = Annotated[
    DiagCurvatureConfig | KfacCurvatureConfig | KfacTriCurvatureConfig | IdentityCurvatureConfig,
    Field(discriminator="kind"),
]
"""The ``lalora.curvature`` section: one of the sections above, chosen by ``kind``."""
CURVATURE_CONFIGS: dict[str, type[Model]] = {
    "diag": DiagCurvatureConfig,
    "kfac": KfacCurvatureConfig,
    "kfac-tri": KfacTriCurvatureConfig,
    "identity": IdentityCurvatureConfig,
}
"""The section of each built-in curvature kind (lalora.curvature.settings.SETTINGS), in the registry's order."""


class PriorConfig(Model):
    tau_A: float = Field(
        1.0,
        ge=0,
        description="Prior precision of A matrices. At the first anchor (B = 0) A has zero "
        "curvature, so this alone holds A; our default, not the paper's.",
    )
    tau_B: float = Field(1e-4, ge=0, description="Prior precision of B matrices (our default).")


class AccumulationConfig(Model):
    mode: Literal["sum", "online", "replace"] = Field(
        "sum", description="sum: recursive Laplace; online: gamma-decayed (online EWC); replace: newest domain only."
    )
    gamma: float = Field(1.0, ge=0, le=1, description="Decay of earlier domains' curvature for mode online.")


class AutoLambdaConfig(Model):
    """How ``lambda: auto`` searches, per stage, for the lambda that learns most within a forgetting budget."""

    max_forgetting: float | None = Field(
        None,
        ge=0,
        description="The forgetting budget: no earlier domain (source "
        "and probes included) may forget more than this on its validation rows, in "
        "its own score's units. Default: promotion.max_forgetting (one of the two "
        "must be set).",
    )
    min_lambda: float = Field(0.01, gt=0, description="Smallest lambda tried.")
    max_lambda: float = Field(1000.0, gt=0, description="Largest lambda tried.")
    max_trials: int = Field(6, ge=1, description="At most this many trial trainings per stage.")
    trial_share: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share of the stage's steps a trial trains. 1: every "
        "trial is a full-length stage and the best one is kept; below 1 the stage then "
        "trains once more, in full, at the chosen lambda.",
    )
    resolution: float = Field(
        1.5,
        gt=1,
        description="Stop when the feasible lambda and the infeasible one below it are closer than this factor.",
    )
    columns: list[str] | None = Field(
        None,
        min_length=1,
        description="The earlier columns (source, domains, probes, "
        "by name) the budget applies to; the others' forgetting is recorded but does "
        "not bound lambda. Default: every earlier column.",
    )
    choice: Literal["most_learning", "one_se"] = Field(
        "most_learning",
        description="Which feasible trial wins. most_learning: the one whose validation learning is largest. "
        "one_se: the one with the most penalty whose learning is within one paired standard error of the "
        "largest (the one-standard-error rule: trials that differ by less than the validation rows' sampling "
        "error are taken as equal, and the safer one wins).",
    )

    @model_validator(mode="after")
    def _range(self) -> AutoLambdaConfig:
        if self.min_lambda >= self.max_lambda:
            raise ValueError(f"min_lambda ({self.min_lambda:g}) must be below max_lambda ({self.max_lambda:g})")
        return self


class LaLoRAConfig(Model):
    lam: Lambda = Field(
        10.0,
        alias="lambda",
        description="Penalty strength lambda; 0 is plain LoRA; 'auto': each "
        "stage searches for it within a forgetting budget (lalora.auto).",
    )
    auto: AutoLambdaConfig = Field(
        default_factory=AutoLambdaConfig,
        description="The search of lambda: auto (part of a stage's identity only when that stage searches).",
    )
    curvature: CurvatureConfig = Field(
        default_factory=DiagCurvatureConfig,
        description="Curvature structure, by kind: diag, kfac, kfac-tri (with "
        "fisher_type, mc_samples; top_k, max_terms for the Kronecker kinds) or "
        "identity (plain L2).",
    )
    samples: int = Field(
        SAMPLES, gt=0, description="Curvature sequences per domain, N_s (our default; small proxy sets suffice)."
    )
    batch_size: int = Field(
        32,
        gt=0,
        description="Sequences per curvature batch. Over several ranks each rank runs whole batches of this size "
        "in turn (training.batch_size is split across them instead), so it sets the curvature pass's activation "
        "memory on every rank.",
    )
    prior: PriorConfig = Field(default_factory=PriorConfig, description="Prior precision tau per matrix kind.")
    accumulate: AccumulationConfig = Field(
        default_factory=AccumulationConfig, description="How domains' curvature combines."
    )
    memory_budget_gb: float = Field(
        8.0,
        gt=0,
        description="Refuse a curvature pass whose accumulators would exceed "
        "this many GiB (estimated and printed before the pass).",
        json_schema_extra=NOT_IDENTITY,
    )


# --- training, engine, evaluation, tracking ----------------------------------------------
def _every_replay_source() -> list[Literal["domains", "source"]]:
    return ["domains", "source"]


class ReplayConfig(Model):
    """Rehearsal: earlier data mixed into every batch of a stage (the baseline teams use; with lambda 0,
    replay alone; with the penalty, both)."""

    fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of each batch drawn from earlier data: "
        "round(fraction * batch_size) rows a batch (0: no replay).",
    )
    sources: list[Literal["domains", "source"]] = Field(
        default_factory=_every_replay_source,
        description="Where replayed rows come from: 'domains', "
        "the earlier stages' domains' training splits; 'source', the source's training split. Evaluation rows "
        "never.",
    )
    data: list[DomainConfig] = Field(
        default_factory=list,
        description="Named data sets replayed too (every row, "
        "up to train_size; never scored), e.g. general text a team keeps.",
    )
    max_per_domain: int | None = Field(
        None, gt=0, description="At most this many rows of each source (the first of its seeded shuffle); default all."
    )
    seed: int = Field(0, description="Seed of which replayed rows go into which batch.")

    @property
    def enabled(self) -> bool:
        return self.fraction > 0


class TrainingConfig(Model):
    steps: int = Field(300, gt=0, description="Optimizer steps per stage.")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate of the LoRA matrices (our default).")
    batch_size: int = Field(64, gt=0, description="Sequences per step.")
    max_length: int = Field(
        32, gt=1, description="Longest training sequence in tokens; longer ones are truncated or refused (overlong)."
    )
    overlong: Literal["truncate", "error"] = Field(
        "truncate",
        description="A training sequence longer than max_length: truncate it, or stop the run naming the example.",
    )
    seed: int = Field(0, description="Seed of data order and dropout.")
    log_every: int = Field(
        10, gt=0, description="Steps between logged loss / penalty values.", json_schema_extra=NOT_IDENTITY
    )
    checkpoint_every: int = Field(
        50,
        ge=0,
        description="Steps between DeepSpeed checkpoints of the adapter and "
        "optimizer; an interrupted stage restarts from the latest one (0: only at the end).",
        json_schema_extra=NOT_IDENTITY,
    )
    group_by_length: bool = Field(
        False, description="Batch examples of similar length together (less padding; batch order stays shuffled)."
    )
    replay: ReplayConfig = Field(
        default_factory=ReplayConfig,
        description="Earlier data mixed into each batch (part of the stage's identity when on).",
    )
    optimizer_impl: Literal["auto", "fused", "unfused"] = Field(
        "auto",
        description="AdamW's implementation: one fused kernel for every matrix ('fused'), or torch's own "
        "choice ('unfused': multi-tensor on a GPU, a loop over the matrices on the CPU); 'auto': fused on a GPU, "
        "unfused on the CPU. The same update up to rounding, so not part of a stage's identity.",
        json_schema_extra=NOT_IDENTITY,
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in the "
        "backward pass instead of keeping them: less memory for long sequences, "
        "about one more forward of compute. Same result; not part of the identity.",
        json_schema_extra=NOT_IDENTITY,
    )
    loss_chunk: int = Field(
        0,
        ge=0,
        description="Target positions per chunk of a cross-entropy fused with the LM head: "
        "the head and the loss run on the positions whose next token is a target only (not on "
        "prompts or padding), chunk by chunk, each chunk's gradient taken at once, so the "
        "full (batch x length x vocabulary) float32 logits are never held (over Llama 3's 128k "
        "vocabulary, 4 GiB at 8 x 1024 tokens). 0: the model's own loss over the full logits. "
        "Same loss up to rounding; not part of the identity. Needs a frozen linear LM head.",
        json_schema_extra=NOT_IDENTITY,
    )


class DeepSpeedConfig(Model):
    zero_stage: Literal[0, 1, 2, 3] = Field(
        0,
        description="ZeRO stage. At 3 the base's weights are partitioned across "
        "the ranks (fine-tune and curvature) and the LoRA matrices kept whole on "
        "every rank, where the penalty and the curvature read them.",
    )
    persistence_threshold: int = Field(
        100_000,
        ge=0,
        description="At ZeRO-3, parameters of at most this many elements stay whole on every rank (DeepSpeed's "
        "stage3_param_persistence_threshold, its default): gathered once, not every step. The LoRA matrices "
        "stay whole whatever it is (the threshold used is at least the largest of them); 0 partitions every "
        "base matrix larger than them.",
        json_schema_extra=NOT_IDENTITY,
    )
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Training precision inside the engine.")
    gradient_clipping: float = Field(1.0, ge=0, description="Global gradient-norm clip (0: off).")
    world_size: int = Field(
        1,
        ge=1,
        description="Processes per node for fine-tuning and curvature; above 1 (or with "
        "a hostfile) both steps run through the deepspeed launcher, data parallel.",
        json_schema_extra=NOT_IDENTITY,
    )
    hostfile: str | None = Field(
        None,
        description="DeepSpeed hostfile for multi-node runs ('host slots=N' lines); "
        "relative to the config file or absolute.",
        json_schema_extra=NOT_IDENTITY,
    )


class EvaluationConfig(Model):
    batch_size: int = Field(200, gt=0, description="Prompts per generation batch.")
    max_new_tokens: int = Field(12, gt=0, description="Greedy generation length limit.")


MLFLOW_STORE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc", "uc")
"""URI schemes (before any ``+driver``) of the stores MLflow keeps a model registry in; its file store does not."""


def store_uri_problem(uri: str) -> str | None:
    """Why ``uri`` cannot be an MLflow store with a model registry, or None."""
    from urllib.parse import urlsplit

    if urlsplit(uri).scheme.split("+", 1)[0] in MLFLOW_STORE_SCHEMES:
        return None
    return (
        f"{uri!r} is not an MLflow store with a model registry: give sqlite:///PATH, postgresql://HOST/DB "
        "(or mysql://, mssql://), or http(s)://HOST:PORT of a tracking server"
    )


class TrackingConfig(Model):
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; empty: sqlite:///<out>/mlflow.db.")
    experiment: str = Field("lalora", min_length=1, description="MLflow experiment name.")
    registered_model: str = Field(
        "lalora-adapter", min_length=1, description="Registered model holding one version per stage."
    )
    latest_alias: str = Field(
        "newest",
        min_length=1,
        description="Alias moved to every new version. MLflow reserves "
        "'latest' (models:/NAME/latest already means the newest version), so it cannot be used.",
    )

    @field_validator("registered_model")
    @classmethod
    def _safe_model_name(cls, v: str) -> str:
        if not NAME.match(v):  # it also names directories (forks), so it may not hold '/' or '..'
            raise ValueError(f"{v!r} is not a valid registered model name (letters, digits, '.', '_', '-'; up to 64)")
        return v

    @field_validator("mlflow_uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v and urlsplit(v).password is not None:
            raise ValueError(
                "holds a password; secrets come only from the environment: drop it from the URI and "
                "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
            )
        problem = store_uri_problem(v) if v else None
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("latest_alias")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v.lower() == "latest" or re.fullmatch(r"[vV]\d+", v):
            raise ValueError(f"alias {v!r} is reserved by MLflow; choose another (default 'newest')")
        return v


class PromotionConfig(Model):
    alias: str = Field(
        "champion",
        min_length=1,
        description="Alias that moves to a new version only when every "
        "condition below holds; a version that fails stays registered, tagged with the reason.",
    )
    min_bwt: float | None = Field(
        None, description="Backward transfer after the stage must be >= this (e.g. -0.05); empty: not checked."
    )
    max_forgetting: float | None = Field(
        None,
        ge=0,
        description="No earlier domain (source and probes included) "
        "may have forgotten more than this, in its own score's units (accuracy: "
        "0..1; a perplexity-scored domain: its NLL); empty: not checked.",
    )
    min_learning: float | None = Field(
        None,
        description="The stage's own domain must gain at least this "
        "(R[t][t] - R[t-1][t], sign flipped for a lower-is-better score); empty: "
        "not checked.",
    )


class OrchestrationConfig(Model):
    launch_retries: int = Field(
        1,
        ge=0,
        validation_alias=AliasChoices("launch_retries", "finetune_retries"),
        description="Prefect retries of a stage's precision and fine-tune steps after a "
        "transient failure (a launched rank killed by a signal, a failed rendezvous; "
        "pipelines.runtime.launch.is_transient), never after the step's own error. Safe: the "
        "precision is recomputed from the same inputs, a fine-tune resumes from its latest "
        "DeepSpeed checkpoint. Formerly finetune_retries (still read).",
    )
    retry_delay_seconds: float = Field(5.0, ge=0, description="Wait before a retry.")
    lock_timeout_seconds: float = Field(
        6 * 3600.0,
        gt=0,
        description="How long a run waits for the run holding "
        "its lineage (the output directory's lock, the store's lease) before it "
        "gives up in one line with exit 4.",
    )
    lease_ttl_seconds: float = Field(
        120.0,
        gt=0,
        description="Workers on several hosts sharing one tracking "
        "server write a lineage one at a time, under a lease kept in the store; a "
        "holder heartbeats every quarter of this, and a lease whose last heartbeat is "
        "older is taken over (its holder died).",
    )


class NotifyConfig(Model):
    webhook: str | None = Field(
        None,
        description="URL that receives a small JSON POST (event, lineage, stage, "
        "version, reason, flow_run) when a run fails or the gate rejects a stage's "
        "promotion; empty: none. Prefect events are emitted either way.",
    )
    timeout_seconds: float = Field(
        10.0, gt=0, description="How long a webhook POST may take; a webhook that fails is logged, never fails the run."
    )

    @field_validator("webhook")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v


class RuntimeConfig(Model):
    threads: int | None = Field(
        None,
        ge=1,
        description="torch threads for every step (pretraining, curvature, "
        "fine-tuning, scoring); empty: torch's default (the machine's cores, or "
        "OMP_NUM_THREADS). On a CPU the thread count changes the order of floating-point "
        "sums, so pin it for results that do not depend on the machine. Not part of a "
        "stage's identity (like deepspeed.world_size).",
    )


class LineageConfig(Model):
    name: str = Field("lineage", description="Lineage name (MLflow run name, tags).")
    seed: int = Field(0, description="Global seed (model init, pretraining).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter shape.")
    lalora: LaLoRAConfig = Field(default_factory=LaLoRAConfig, description="The Laplace penalty.")
    source: DomainConfig = Field(
        default_factory=lambda: DomainConfig(name="source"),
        description="What the base "
        "model knows: curvature data of the first stage and a forgetting probe; pretraining "
        "data of the tiny base.",
    )
    domains: list[DomainConfig] = Field(min_length=1, description="New domains, one stage each, in order.")
    probes: list[DomainConfig] = Field(
        default_factory=list,
        description="Evaluation-only domains (benchmarks of what "
        "the base model knows, e.g. HellaSwag): scored after every stage as extra "
        "columns of R, never trained on or used for curvature.",
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Fine-tuning per stage.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="The DeepSpeed engine.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Scoring after every stage.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking and registry.")
    promotion: PromotionConfig = Field(default_factory=PromotionConfig, description="Gate on the champion alias.")
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig, description="Prefect retries.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Compute resources of this process.")
    notify: NotifyConfig = Field(
        default_factory=NotifyConfig, description="Who hears of a failed run or a rejected promotion."
    )
    catalogue: str | None = Field(
        None,
        description="YAML file listing further domains (a list, or a mapping with "
        "'domains'), appended after 'domains' and re-read on every run, so a scheduled run "
        "picks up new ones. Relative to the config file or absolute.",
    )

    @model_validator(mode="after")
    def _world_divides_batch(self) -> LineageConfig:
        if self.training.batch_size % self.deepspeed.world_size:
            raise ValueError(
                f"training.batch_size ({self.training.batch_size}) must be divisible by "
                f"deepspeed.world_size ({self.deepspeed.world_size})"
            )
        return self

    @model_validator(mode="after")
    def _unique_domains(self) -> LineageConfig:
        names = [d.name for d in self.eval_domains]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"domain names must be unique (source included); repeated: {', '.join(dup)}")
        for field, sets in (
            ("model.pretrain.extra_data", self.model.pretrain.extra_data),
            ("training.replay.data", self.training.replay.data),
        ):
            extra = [d.name for d in sets]  # each name is a data file under data/
            dup = sorted({n for n in extra if extra.count(n) > 1 or n in names})
            if dup:
                raise ValueError(
                    f"{field} names must differ from each other and from the domains' "
                    f"(they name data files); rename: {', '.join(dup)}"
                )
            names = names + extra
        return self

    @model_validator(mode="after")
    def _stage_overrides(self) -> LineageConfig:
        for field, sets in (
            ("source", [self.source]),
            ("probes", self.probes),
            ("model.pretrain.extra_data", self.model.pretrain.extra_data),
            ("training.replay.data", self.training.replay.data),
        ):
            for d in sets:
                own = [k for k in ("lam", "steps", "lr") if getattr(d, k) is not None]
                if own:
                    names = ", ".join("lambda" if k == "lam" else k for k in own)
                    raise ValueError(
                        f"{field} {d.name}: {names} can only be set on a stage's domain (under domains); "
                        "it is not trained"
                    )
        return self

    @model_validator(mode="after")
    def _auto_budget(self) -> LineageConfig:
        """With a stage that searches lambda: a forgetting budget, and validation rows on every scored domain."""
        if not self.searches:
            return self
        if self.lalora.auto.max_forgetting is None and self.promotion.max_forgetting is None:
            raise ValueError(
                "lambda auto needs a forgetting budget: set lalora.auto.max_forgetting (or "
                "promotion.max_forgetting), the most an earlier domain may forget in a stage"
            )
        named = {d.name for d in self.eval_domains}
        unknown = [c for c in self.lalora.auto.columns or [] if c not in named]
        if unknown:
            raise ValueError(
                f"lalora.auto.columns: {', '.join(unknown)} is not a column of this lineage; choose from "
                f"{', '.join(d.name for d in self.eval_domains)}"
            )
        external = [d.name for d in self.eval_domains if d.score.kind == "lm_eval"]
        if external:
            raise ValueError(
                f"lambda auto scores its trials on validation rows, which lm_eval-scored domains do not "
                f"have ({', '.join(external)}): score them with a preset's scorer, or fix lambda"
            )

        def with_val(d: DomainConfig) -> DomainConfig:
            return d if d.val_size is not None else d.model_copy(update={"val_size": VAL_SIZE})

        for name in ("source", "domains", "probes"):  # frozen: set once here, as if written in the file
            value = getattr(self, name)
            object.__setattr__(self, name, with_val(value) if name == "source" else [with_val(d) for d in value])
            self.__pydantic_fields_set__.add(name)
        return self

    @model_validator(mode="after")
    def _resolve_samples(self) -> LineageConfig:
        """Each domain's curvature rows resolved here, once: ``curvature_size``, else ``lalora.samples``."""
        n = self.lalora.samples
        object.__setattr__(self, "source", self.source.with_samples(n))  # frozen: the fields keep their values
        for name in ("domains", "probes"):
            object.__setattr__(self, name, [d.with_samples(n) for d in getattr(self, name)])
        return self

    @property
    def searches(self) -> bool:
        """Whether any stage searches its lambda (``auto``)."""
        return any(self.stage_lambda(t) == "auto" for t in range(1, len(self.domains) + 1))

    @property
    def penalised(self) -> bool:
        """Whether any stage trains with the penalty: then every stage accumulates the precision."""
        return any(self.stage_lambda(t) != 0 for t in range(1, len(self.domains) + 1))

    @property
    def budget(self) -> float:
        """The forgetting budget of ``lambda: auto``."""
        budget = self.lalora.auto.max_forgetting
        budget = self.promotion.max_forgetting if budget is None else budget
        assert budget is not None, "validated: a config that searches has a budget"
        return budget

    def stage_lambda(self, stage: int) -> float | str:
        """Stage ``stage``'s lambda: its domain's own, else ``lalora.lambda`` (a number, or 'auto')."""
        own = self.domains[stage - 1].lam
        return self.lalora.lam if own is None else own

    def stage_lalora(self, stage: int) -> LaLoRAConfig:
        """``lalora`` as stage ``stage`` trains with it: its lambda resolved (a number; 'auto' is searched first)."""
        lam = self.stage_lambda(stage)
        if lam == "auto":
            raise ValueError(f"stage {stage} searches its lambda: train it with a chosen one (with_stage)")
        return self.lalora.model_copy(update={"lam": float(lam)})

    def stage_training(self, stage: int) -> TrainingConfig:
        """``training`` as stage ``stage`` runs it: its domain's own steps and learning rate where set."""
        d = self.domains[stage - 1]
        update = {k: v for k, v in (("steps", d.steps), ("lr", d.lr)) if v is not None}
        return self.training.model_copy(update=update) if update else self.training

    def with_stage(self, stage: int, **settings: Any) -> LineageConfig:
        """This config with stage ``stage``'s domain setting ``settings`` (lam, steps, lr) as its own: a trial of
        lambda auto, or the stage trained at the chosen lambda. Validated again, as a launched rank reads it."""
        data = self.as_json()
        data["domains"][stage - 1] |= {"lambda" if k == "lam" else k: v for k, v in settings.items()}
        return LineageConfig.model_validate(data)

    def as_json(self) -> dict[str, Any]:
        """The config as JSON, only what was set: validating it again gives the same config (a full dump
        would not: a preset's mapping fields would read as set). What a launched rank or a sweep point gets."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    @property
    def all_domains(self) -> list[DomainConfig]:
        """Source first, then the stages' domains: the columns of R."""
        return [self.source, *self.domains]

    @property
    def eval_domains(self) -> list[DomainConfig]:
        """Every scored domain: ``all_domains`` then the probes."""
        return [*self.all_domains, *self.probes]
