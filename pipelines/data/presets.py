"""Records -> rows: the preset loaders and the generic field mapping / Jinja templates.

A row is a plain dict. Every row has ``prompt`` and ``answer`` (the training target: the
prompt is masked, the answer carries the loss). Multiple-choice rows also have ``choices``
(the continuations' texts, without the leading space the scorer adds, as lm-eval's target
delimiter), ``label`` (the gold index) and, when each choice has its own context
(WinoGrande's partial scoring), ``contexts``; their answer is the gold continuation.

Prompt formats follow lm-eval-harness (zero-shot): ``Question: ...\\nAnswer:`` with the
answer after a space, HellaSwag's text preprocessing, WinoGrande's partial evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.config.formats import RowFormat

Row = dict[str, Any]
Converter = Callable[[dict[str, Any]], Row | None]
"""One record (column -> value) to a row; None skips the record (e.g. a blank line of text)."""


class RowError(ValueError):
    """A record that the format cannot read; the caller adds the domain and the row index."""


@dataclass(frozen=True)
class Preset:
    columns: tuple[str, ...]
    """Columns the dataset must have."""
    convert: Converter


def _qa(question: str, answer: str) -> Converter:
    return lambda r: {
        "prompt": f"Question: {str(r[question]).strip()}\nAnswer:",
        "answer": f" {str(r[answer]).strip()}",
    }


def _mc(prompt: str, choices: list[str], label: int, contexts: list[str] | None = None) -> Row:
    if not 0 <= label < len(choices):
        raise RowError(f"gold label {label} is not an index of {len(choices)} choices")
    row: Row = {
        "prompt": contexts[label] if contexts else prompt,
        "answer": f" {choices[label]}",
        "choices": choices,
        "label": label,
    }
    if contexts:
        row["contexts"] = contexts
    return row


def _label(value: Any, what: str) -> int:
    text = str(value).strip()
    if not text.lstrip("-").isdigit():
        raise RowError(f"{what} {value!r} is not a choice index (an unlabeled test split? use the validation split)")
    return int(text)


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: WikiHow '[title]' markers become sentence breaks, other tags go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(r: dict[str, Any]) -> Row:
    ctx = f"{r['ctx_a']} {str(r['ctx_b']).capitalize()}"
    query = _hellaswag_clean(f"{r['activity_label']}: {ctx}")
    return _mc(query, [_hellaswag_clean(e) for e in r["endings"]], _label(r["label"], "label"))


def _arc(r: dict[str, Any]) -> Row:
    labels = list(r["choices"]["label"])
    if r["answerKey"] not in labels:
        raise RowError(f"answerKey {r['answerKey']!r} is not one of the choice labels {labels}")
    return _mc(f"Question: {r['question']}\nAnswer:", list(r["choices"]["text"]), labels.index(r["answerKey"]))


def _winogrande(r: dict[str, Any]) -> Row:
    sentence = str(r["sentence"])
    if "_" not in sentence:
        raise RowError("sentence has no '_' blank")
    idx = sentence.index("_")
    tail = sentence[idx + 1 :].strip()
    contexts = [sentence[:idx] + str(r["option1"]), sentence[:idx] + str(r["option2"])]
    return _mc("", [tail, tail], _label(r["answer"], "answer") - 1, contexts)


def _text(r: dict[str, Any]) -> Row | None:
    text = str(r["text"])
    return {"prompt": "", "answer": text} if text.strip() else None


PRESETS: dict[str, Preset] = {
    "gsm8k": Preset(("question", "answer"), _qa("question", "answer")),
    "metamathqa": Preset(("query", "response"), _qa("query", "response")),
    "hellaswag": Preset(("activity_label", "ctx_a", "ctx_b", "endings", "label"), _hellaswag),
    "arc": Preset(("question", "choices", "answerKey"), _arc),
    "winogrande": Preset(("sentence", "option1", "option2", "answer"), _winogrande),
    "text": Preset(("text",), _text),
}


# --- field mapping and templates ---------------------------------------------------------
def _template(source: str) -> tuple[Callable[[dict[str, Any]], str], list[str]]:
    """A compiled Jinja template (sandboxed, undefined names are errors) and the columns it reads."""
    from jinja2 import StrictUndefined, TemplateSyntaxError, meta
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    try:
        names = meta.find_undeclared_variables(env.parse(source))
        template = env.from_string(source)
    except TemplateSyntaxError as e:
        raise RowError(f"template {source!r} is not valid Jinja: {e.message}") from None
    return template.render, sorted(names)


def _gold(value: Any, choices: list[str]) -> int:
    if isinstance(value, bool):
        raise RowError(f"label {value!r} is not a choice index")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    if len(text) == 1 and text.isalpha() and text.isupper():
        return ord(text) - ord("A")
    if text in choices:
        return choices.index(text)
    raise RowError(f"label {value!r} is neither an index, a letter A-Z nor one of the choices")


def _field_or_template(field: str, template: str | None) -> tuple[Callable[[dict[str, Any]], str], list[str]]:
    """The text of a row from ``template`` when given, else the column ``field``; and the columns it reads."""
    if template is not None:
        return _template(template)
    return (lambda r: str(r[field])), [field]


def mapping_converter(fmt: RowFormat) -> tuple[Converter, list[str]]:
    """The converter of a field mapping / templates, and the columns it needs (in mapping order)."""
    prompt_fn, needed = _field_or_template(fmt.prompt_field, fmt.prompt_template)
    if fmt.choices_field is not None:
        assert fmt.label_field is not None
        choices_field, label_field = fmt.choices_field, fmt.label_field
        needed += [choices_field, label_field]

        def convert_mc(r: dict[str, Any]) -> Row:
            choices = r[choices_field]
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                raise RowError(
                    f"column {choices_field} must hold a non-empty list of strings, got {type(choices).__name__}"
                )
            return _mc(prompt_fn(r), list(choices), _gold(r[label_field], choices))

        return convert_mc, list(dict.fromkeys(needed))
    answer_fn, names = _field_or_template(fmt.answer_field, fmt.answer_template)
    needed += names
    return (lambda r: {"prompt": prompt_fn(r), "answer": answer_fn(r)}), list(dict.fromkeys(needed))


def converter(fmt: RowFormat) -> tuple[Converter, list[str]]:
    """The record -> row function of a format (its preset, or its mapping) and the columns it reads."""
    if fmt.preset is not None:
        preset = PRESETS[fmt.preset]
        return preset.convert, list(preset.columns)
    return mapping_converter(fmt)
