"""How a domain's rows are read and scored: presets, field mapping, templates, scorers.

Configuration models only (the config's one base, ``pipelines.config.base.Model``); ``pipelines/config/domains.py``
builds ``DomainConfig`` from them. The preset *loaders* (record -> row) live in ``pipelines/data/presets.py``;
this module only knows their names and default scorers.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from pipelines.config.base import Model

PresetName = Literal["gsm8k", "metamathqa", "hellaswag", "arc", "winogrande", "text"]
MC_PRESETS = ("hellaswag", "arc", "winogrande")
"""Presets whose rows carry choices and a gold label."""


# --- scoring ----------------------------------------------------------------------------
class GenerateScoring(Model):
    kind: Literal["generate"] = "generate"
    extractor: Literal["exact", "gsm8k", "last_number", "regex"] = Field(
        "exact",
        description="How the answer is read from a greedy generation (and from the reference): exact: the "
        "whole text up to EOS, stripped; gsm8k: the number after '####' (lm-eval strict-match); last_number: the last "
        "number in the text (lm-eval flexible-extract); regex: the first group of `pattern`.",
    )
    pattern: str | None = Field(
        None, description="Regular expression for extractor regex (its first group, or the whole match, is the answer)."
    )
    max_new_tokens: int | None = Field(
        None, gt=0, description="Generation length limit; default evaluation.max_new_tokens."
    )
    stop: list[str] = Field(
        default_factory=list,
        description="Stop strings: generation ends at the first one and the "
        "text is cut there (e.g. 'Question:' for GSM8K).",
    )

    @model_validator(mode="after")
    def _pattern(self) -> GenerateScoring:
        if self.extractor == "regex":
            if not self.pattern:
                raise ValueError("extractor regex needs a pattern, e.g. pattern: 'The answer is: (.+)'")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {e}") from None
        elif self.pattern is not None:
            raise ValueError(f"pattern is only used by extractor regex (extractor is {self.extractor!r})")
        return self


class MultipleChoiceScoring(Model):
    kind: Literal["multiple_choice"] = "multiple_choice"
    metric: Literal["acc", "acc_norm"] = Field(
        "acc_norm",
        description="Score in R: acc ranks choices by summed "
        "log-likelihood; acc_norm by log-likelihood per character of the choice "
        "(both as lm-eval reports them; both are always computed).",
    )


class PerplexityScoring(Model):
    kind: Literal["perplexity"] = "perplexity"
    metric: Literal["nll", "perplexity"] = Field(
        "nll",
        description="Score in R: mean target-token NLL or its exponential (lower is better; both are always computed).",
    )


class LmEvalScoring(Model):
    """Scored by lm-evaluation-harness itself (the ``lm-eval`` extra): a registered task, or one a YAML in
    ``include_path`` defines (offline: ``dataset_path: json`` with local ``data_files``)."""

    kind: Literal["lm_eval"] = "lm_eval"
    task: str = Field(min_length=1, description="The lm-eval task (its output_type must be multiple_choice).")
    include_path: str | None = Field(None, description="Directory of custom task YAMLs; relative to the config file.")
    metric: str = Field("acc", min_length=1, description="The task's metric that goes into R (acc, acc_norm, ...).")
    num_fewshot: int = Field(0, ge=0, description="Few-shot examples per prompt.")
    limit: int | None = Field(None, gt=0, description="Score at most this many documents of the task.")
    add_bos_token: bool = Field(
        True,
        description="Put BOS before each context, as the project's own scorers do "
        "(lm-eval otherwise leaves it to the tokenizer).",
    )


def _scoring_shorthand(v: Any) -> Any:
    """``scoring: perplexity`` means ``{kind: perplexity}``; the old ``exact_match`` is generate/exact."""
    if v == "exact_match":
        return {"kind": "generate", "extractor": "exact"}
    if isinstance(v, str):
        return {"kind": v}
    return v


Scoring = Annotated[
    GenerateScoring | MultipleChoiceScoring | PerplexityScoring | LmEvalScoring,
    Field(discriminator="kind"),
    BeforeValidator(_scoring_shorthand),
]

PRESET_SCORING: dict[str, GenerateScoring | MultipleChoiceScoring | PerplexityScoring] = {
    "gsm8k": GenerateScoring(extractor="gsm8k", stop=["Question:"]),
    "metamathqa": GenerateScoring(extractor="regex", pattern=r"The answer is:?\s*([^\n]+)", stop=["Question:"]),
    "hellaswag": MultipleChoiceScoring(metric="acc_norm"),
    "arc": MultipleChoiceScoring(metric="acc_norm"),
    "winogrande": MultipleChoiceScoring(metric="acc"),
    "text": PerplexityScoring(),
}
"""Each preset's default scorer (the one its benchmark is reported with)."""


# --- row format -------------------------------------------------------------------------
_MAPPING_FIELDS = ("prompt_field", "answer_field", "prompt_template", "answer_template", "choices_field", "label_field")


class RowFormat(Model):
    """How records of a dataset become rows: a preset, or a field mapping / Jinja templates."""

    preset: PresetName | None = Field(
        None,
        description="A known dataset shape (fields, prompt format, default "
        "scorer): gsm8k, metamathqa, hellaswag, arc, winogrande or text.",
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt (no preset, no prompt_template).")
    answer_field: str = Field("answer", description="Column holding the answer (the training target).")
    prompt_template: str | None = Field(
        None,
        description="Jinja template of the prompt over the columns, e.g. "
        "'Question: {{question}}\\nAnswer:'; overrides prompt_field.",
    )
    answer_template: str | None = Field(
        None, description="Jinja template of the answer, e.g. ' {{answer}}'; overrides answer_field."
    )
    choices_field: str | None = Field(None, description="Column holding the list of choices (multiple choice).")
    label_field: str | None = Field(
        None,
        description="Column holding the gold choice: an index, a digit string, a "
        "letter A, B, ... or the choice text. The answer is the gold choice.",
    )

    @model_validator(mode="after")
    def _one_way(self) -> RowFormat:
        if self.preset is not None:
            explicit = [f for f in _MAPPING_FIELDS if f in self.model_fields_set]
            if explicit:
                raise ValueError(f"preset {self.preset!r} fixes the fields; drop {', '.join(explicit)} or the preset")
        if (self.choices_field is None) != (self.label_field is None):
            raise ValueError("choices_field and label_field go together (multiple choice needs both)")
        if self.choices_field is not None and {"answer_field", "answer_template"} & self.model_fields_set:
            raise ValueError("with choices_field the answer is the gold choice; drop answer_field / answer_template")
        return self

    @property
    def has_choices(self) -> bool:
        return self.preset in MC_PRESETS or self.choices_field is not None

    def default_scoring(self) -> GenerateScoring | MultipleChoiceScoring | PerplexityScoring:
        if self.preset is not None:
            return PRESET_SCORING[self.preset]
        return MultipleChoiceScoring() if self.choices_field is not None else GenerateScoring()
