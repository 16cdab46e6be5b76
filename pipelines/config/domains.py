"""A domain's config: where its rows come from, how they are read and scored, how they are split."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from pipelines.config.base import NAME, WHEN_SET, Lambda, Model
from pipelines.config.formats import (
    GenerateScoring,
    LmEvalScoring,
    MultipleChoiceScoring,
    PerplexityScoring,
    RowFormat,
    Scoring,
)

VAL_SIZE = 100
"""Validation rows per domain when a lineage searches lambda and the domain sets no val_size."""
SAMPLES = 256
"""``lalora.samples``'s default: curvature sequences of a domain that sets no ``curvature_size``."""

SymbolOp = Literal["copy", "reverse", "next", "previous", "rotate", "double", "increment"]


class GeneratorSource(Model):
    kind: Literal["generator"] = "generator"
    name: Literal["symbol-ops"] = Field("symbol-ops", description="Built-in generator.")
    op: SymbolOp | list[SymbolOp] = Field(
        "copy",
        description="Transformation of the symbol string; a list mixes several, each example drawing one at random.",
    )
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


class LocalSource(Model):
    kind: Literal["local"] = "local"
    path: str = Field(description="A JSONL, JSON, CSV or Parquet file, relative to the config file or absolute.")
    split: str = Field("train", description="Split name datasets gives the file.")


class HubSource(Model):
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
    eval_data: EvalDataConfig | None = Field(
        None,
        description="Evaluation rows from another source and format (e.g. "
        "train on MetaMathQA, score on GSM8K test); default: held out from data.",
    )
    eval_size: int = Field(
        200,
        gt=0,
        description="Held-out examples scored after every stage (at most this many for eval_data and for probes).",
    )
    train_size: int | None = Field(None, gt=0, description="Cap on training examples (after the shuffle); default all.")
    curvature_size: int | None = Field(
        None, gt=0, description="Examples for this domain's curvature; default lalora.samples."
    )
    val_size: int | None = Field(
        None,
        gt=0,
        description="Validation rows, held out from training, curvature and "
        f"evaluation, that lambda: auto scores its trials on (default {VAL_SIZE} when a stage "
        "searches lambda; none otherwise, so other lineages keep their splits).",
        json_schema_extra=WHEN_SET,
    )
    lam: Lambda | None = Field(
        None,
        alias="lambda",
        description="This domain's stage only: its own lambda (a number "
        "or 'auto'); default lalora.lambda. Part of the stage's identity only when set.",
        json_schema_extra=WHEN_SET,
    )
    steps: int | None = Field(
        None,
        gt=0,
        description="This domain's stage only: its optimizer steps; default "
        "training.steps. Part of the stage's identity only when set.",
        json_schema_extra=WHEN_SET,
    )
    lr: float | None = Field(
        None,
        gt=0,
        description="This domain's stage only: its learning rate; default "
        "training.lr. Part of the stage's identity only when set.",
        json_schema_extra=WHEN_SET,
    )
    scoring: Scoring | None = Field(
        None,
        description="Score of the R matrix, by kind: generate, multiple_choice or "
        "perplexity. Default: the preset's (generate with extractor exact without one).",
    )
    chat_template: Literal["never", "auto", "always"] = Field(
        "never",
        description="Wrap each prompt as a user turn "
        "in the tokenizer's chat template: auto when it has one; "
        "always fails if it has none.",
    )
    split_seed: int = Field(
        0,
        description="Seed of the generator (built-in data) and of the shuffle fixing the "
        "train / eval / curvature splits.",
    )
    _samples: int = PrivateAttr(default=SAMPLES)
    """The lineage's ``lalora.samples``, set when the lineage's config loads (``LineageConfig``'s validator); not a
    field, so it is in no dump: a stage's identity holds it once, in ``lalora``."""

    @model_validator(mode="after")
    def _scoring_fits(self) -> DomainConfig:
        if self.score.kind == "multiple_choice" and not self.eval_format.has_choices:
            raise ValueError(
                "scoring multiple_choice needs choices: use preset hellaswag, arc or winogrande, or set "
                "choices_field and label_field" + (" on eval_data" if self.eval_data else "")
            )
        return self

    @property
    def curvature_rows(self) -> int:
        """Training rows this domain gives the curvature: ``curvature_size``, else the lineage's ``lalora.samples``."""
        return self.curvature_size or self._samples

    def with_samples(self, samples: int) -> DomainConfig:
        """This domain in a lineage whose ``lalora.samples`` is ``samples`` (a copy: a domain may be shared)."""
        if self._samples == samples:
            return self
        copy = self.model_copy()
        copy._samples = samples
        return copy

    @property
    def eval_format(self) -> RowFormat:
        """The format of the evaluation rows."""
        return self.eval_data if self.eval_data is not None else self

    @property
    def score(self) -> GenerateScoring | MultipleChoiceScoring | PerplexityScoring | LmEvalScoring:
        """The scorer in effect: ``scoring`` or the evaluation format's default."""
        return self.scoring if self.scoring is not None else self.eval_format.default_scoring()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError(f"{v!r} is not a valid domain name (letters, digits, '.', '_', '-'; up to 64)")
        return v
