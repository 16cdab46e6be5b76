import json

import pytest

from pipelines.config import DomainConfig, GeneratorSource, LocalSource
from pipelines.data import DataError, collate, encode, load_domain
from pipelines.generators import symbol_ops
from pipelines.modeling import char_tokenizer


def test_generator_is_deterministic_and_correct():
    cfg = GeneratorSource(op="next", alphabet="abc", size=50)
    rows = symbol_ops(cfg, seed=1)
    assert rows == symbol_ops(cfg, seed=1) and rows != symbol_ops(cfg, seed=2)
    for r in rows:
        s = r["prompt"].removeprefix("next ").removesuffix("=")
        assert r["answer"] == "".join("abc"[("abc".index(c) + 1) % 3] for c in s)
    mixed = symbol_ops(GeneratorSource(op=["copy", "reverse"], size=200), seed=0)
    assert {r["prompt"].split()[0] for r in mixed} == {"copy", "reverse"}


def test_generated_domain_goes_through_datasets_with_fixed_splits(tmp_path):
    cfg = DomainConfig(name="d", data=GeneratorSource(op="double", size=300), eval_size=50)
    a = load_domain(cfg, tmp_path, default_curvature=20)
    b = load_domain(cfg, tmp_path, default_curvature=20)
    assert (tmp_path / "d.jsonl").is_file()
    assert len(a.eval) == 50 and len(a.train) == 250 and len(a.curvature) == 20
    assert a.curvature == a.train[:20] and a.fingerprint == b.fingerprint
    other = load_domain(cfg.model_copy(update={"split_seed": 5}), tmp_path / "x", 20)
    assert other.fingerprint != a.fingerprint


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_local_files_with_field_mapping(tmp_path, suffix):
    rows = [{"q": f"question {i}", "a": str(i * 2)} for i in range(30)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pandas as pd

        frame = pd.DataFrame(rows)
        frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path, index=False)
    cfg = DomainConfig(name="local", data=LocalSource(path=str(path)), prompt_field="q", answer_field="a", eval_size=10)
    splits = load_domain(cfg, tmp_path / "cache", default_curvature=5)
    assert len(splits.eval) == 10 and len(splits.train) == 20
    assert all(set(r) == {"prompt", "answer"} for r in splits.train)
    assert {r["answer"] for r in splits.eval + splits.train} == {str(i * 2) for i in range(30)}


def test_data_errors_are_clear(tmp_path):
    missing = DomainConfig(name="m", data=LocalSource(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="data file .*nope.jsonl not found"):
        load_domain(missing, tmp_path, 5)
    f = tmp_path / "x.jsonl"
    f.write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(30)))
    cols = DomainConfig(name="c", data=LocalSource(path=str(f)), eval_size=5)
    with pytest.raises(DataError, match="column\\(s\\) prompt, answer not in the data \\(columns: text\\)"):
        load_domain(cols, tmp_path, 5)
    small = DomainConfig(name="s", data=GeneratorSource(size=10), eval_size=10)
    with pytest.raises(DataError, match="10 rows cannot give eval_size=10"):
        load_domain(small, tmp_path, 5)


def test_encoding_masks_prompt_and_padding():
    tok = char_tokenizer()
    enc = encode(tok, [{"prompt": "copy ab=", "answer": "ab"}, {"prompt": "copy a=", "answer": "a"}], max_length=32)
    first = enc[0]
    assert first.input_ids[0] == tok.bos_token_id and first.input_ids[-1] == tok.eos_token_id
    n_prompt = 1 + len("copy ab=")
    assert first.labels[:n_prompt] == [-100] * n_prompt
    assert first.labels[n_prompt:] == first.input_ids[n_prompt:]
    assert tok.decode(first.input_ids[n_prompt:-1]) == "ab"
    batch = collate(enc, tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(first.input_ids))
    assert batch["attention_mask"][1].sum() == len(enc[1].input_ids)
    assert (batch["labels"][1, len(enc[1].input_ids):] == -100).all()
    truncated = encode(tok, [{"prompt": "copy abcdef=", "answer": "abcdef"}], max_length=8)[0]
    assert len(truncated.input_ids) == 8 == len(truncated.labels)
