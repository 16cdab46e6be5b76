"""Answer extractors for generated text, with lm-eval-harness's GSM8K semantics.

``exact`` compares the whole stripped text (the demo's score). The others read an answer
out of the text and normalise it the way lm-eval's GSM8K task does before its exact match:
commas, dollar signs, anything up to ``#### `` and a trailing period are removed, case is
ignored. The reference answer goes through the same extractor; where the extractor finds
nothing in it (a reference that is already just "18"), the whole reference is used.
"""

from __future__ import annotations

import re

GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
"""lm-eval gsm8k ``strict-match``."""
FLEXIBLE_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
"""lm-eval gsm8k ``flexible-extract`` (the last match counts)."""
_IGNORE = [re.compile(p) for p in (r",", r"\$", r"(?s).*#### ", r"\.$")]


def normalize(text: str) -> str:
    """lm-eval's ``regexes_to_ignore`` for GSM8K, then strip and lower-case."""
    for pattern in _IGNORE:
        text = pattern.sub("", text)
    return text.strip().lower()


def extract(text: str, extractor: str, pattern: str | None = None) -> str | None:
    """The answer in ``text`` (None: none found), normalised unless ``extractor`` is exact."""
    if extractor == "exact":
        return text.strip()
    if extractor == "gsm8k":
        m = GSM8K_STRICT.search(text)
        found = m.group(1) if m else None
    elif extractor == "last_number":
        matches = FLEXIBLE_NUMBER.findall(text)
        found = next((g for g in matches[-1] if g), None) if matches else None
    elif extractor == "regex":
        assert pattern is not None, "extractor regex needs a pattern"
        m = re.search(pattern, text)
        found = (m.group(1) if m.groups() else m.group(0)) if m else None
    else:
        raise ValueError(f"unknown extractor {extractor!r}; expected exact, gsm8k, last_number or regex")
    return None if found is None else normalize(found)


def reference(answer: str, extractor: str, pattern: str | None = None) -> str:
    """The gold answer, read from the reference text with the same extractor."""
    found = extract(answer, extractor, pattern)
    return found if found is not None else normalize(answer)


def is_correct(generated: str, answer: str, extractor: str, pattern: str | None = None) -> bool:
    predicted = extract(generated, extractor, pattern)
    return predicted is not None and predicted == reference(answer, extractor, pattern)
