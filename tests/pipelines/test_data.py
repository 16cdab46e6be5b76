import json

import pytest

from pipelines.config import DomainConfig, EvalDataConfig, GeneratorSource, HubSource, LocalSource
from pipelines.data.generators import symbol_ops
from pipelines.data.sources import DataError, load_domain
from pipelines.data.tokens import collate, encode, length_grouped, train_batches
from pipelines.runtime.models import char_tokenizer
from tests.pipelines.fixtures import hub_dir


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
    a = load_domain(cfg.with_samples(20), tmp_path)
    b = load_domain(cfg.with_samples(20), tmp_path)
    assert (tmp_path / "d.jsonl").is_file()
    assert len(a.eval) == 50 and len(a.train) == 250 and len(a.curvature) == 20
    assert a.curvature == a.train[:20] and a.fingerprint == b.fingerprint
    other = load_domain(cfg.model_copy(update={"split_seed": 5}), tmp_path / "x")
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
    splits = load_domain(cfg, tmp_path / "cache")
    assert len(splits.eval) == 10 and len(splits.train) == 20
    assert all(set(r) == {"prompt", "answer"} for r in splits.train)
    assert {r["answer"] for r in splits.eval + splits.train} == {str(i * 2) for i in range(30)}


def test_data_errors_are_clear(tmp_path):
    missing = DomainConfig(name="m", data=LocalSource(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match=r"data file .*nope.jsonl not found"):
        load_domain(missing, tmp_path)
    f = tmp_path / "x.jsonl"
    f.write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(30)))
    cols = DomainConfig(name="c", data=LocalSource(path=str(f)), eval_size=5)
    with pytest.raises(DataError, match="column\\(s\\) prompt, answer not in the data \\(columns: text\\)"):
        load_domain(cols, tmp_path)
    small = DomainConfig(name="s", data=GeneratorSource(size=10), eval_size=10)
    with pytest.raises(DataError, match="10 rows cannot give eval_size=10"):
        load_domain(small, tmp_path)


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
    assert (batch["labels"][1, len(enc[1].input_ids) :] == -100).all()
    truncated = encode(tok, [{"prompt": "copy abcdef=", "answer": "abcdef"}], max_length=8)[0]
    assert len(truncated.input_ids) == 8 == len(truncated.labels)


# --- sources, splits and formats ---------------------------------------------------------------
QA = [{"question": f"What is {i} + {i}?", "answer": f"{i} plus {i} is {2 * i}\n#### {2 * i}"} for i in range(40)]


def test_hub_source_loads_config_and_split(tmp_path):
    repo = hub_dir(tmp_path, "qa", {"main": {"train": QA[:30], "test": QA[30:]}, "other": {"train": QA[:5]}})
    cfg = DomainConfig(
        name="qa",
        data=HubSource(id=str(repo), name="main", split="train"),
        preset="gsm8k",
        eval_size=10,
        curvature_size=4,
    )
    splits = load_domain(cfg, tmp_path / "cache")
    assert len(splits.eval) == 10 and len(splits.train) == 20 and splits.curvature == splits.train[:4]
    assert {r["prompt"] for r in splits.eval + splits.train} == {
        f"Question: What is {i} + {i}?\nAnswer:" for i in range(30)
    }
    small = load_domain(
        cfg.model_copy(update={"data": HubSource(id=str(repo), name="main", split="train[:12]")}), tmp_path / "cache"
    )
    assert len(small.eval) + len(small.train) == 12  # the datasets split-slicing syntax passes through


@pytest.mark.parametrize(
    "source,message",
    [
        (
            {"name": "main", "split": "validation"},
            "split 'validation': Unknown split \"validation\". Should be one of \\['train', 'test'\\]\\.",
        ),
        (
            {"name": "mian", "split": "train"},
            "config 'mian' split 'train': BuilderConfig 'mian' not found. Available: \\['main'\\]",
        ),
    ],
)
def test_hub_source_errors_name_the_split_or_config(tmp_path, source, message):
    repo = hub_dir(tmp_path, "qa", {"main": {"train": QA[:30], "test": QA[30:]}})
    cfg = DomainConfig(name="qa", data=HubSource(id=str(repo), **source), preset="gsm8k", eval_size=5)
    with pytest.raises(DataError, match=f"^domain qa: cannot load dataset .*{message}$"):
        load_domain(cfg, tmp_path)


def test_eval_data_gives_the_eval_rows_and_train_size_caps_training(tmp_path):
    repo = hub_dir(tmp_path, "qa", {"main": {"train": QA[:30], "test": QA[30:]}})
    cfg = DomainConfig(
        name="qa",
        data=HubSource(id=str(repo), name="main", split="train"),
        preset="gsm8k",
        eval_data=EvalDataConfig(data=HubSource(id=str(repo), name="main", split="test"), preset="gsm8k"),
        eval_size=50,
        train_size=12,
        split_seed=3,
    )
    splits = load_domain(cfg, tmp_path / "cache")
    assert len(splits.eval) == 10  # eval_size is an upper bound for eval_data: the test split has 10 rows
    assert {r["answer"].split("#### ")[1] for r in splits.eval} == {str(2 * i) for i in range(30, 40)}
    assert len(splits.train) == 12 and splits.curvature == splits.train
    again = load_domain(cfg, tmp_path / "cache")
    assert again.train == splits.train and again.fingerprint == splits.fingerprint  # deterministic shuffle
    reshuffled = load_domain(cfg.model_copy(update={"split_seed": 4}), tmp_path / "cache")
    assert reshuffled.train != splits.train
    probe = load_domain(cfg, tmp_path / "cache", eval_only=True)
    assert probe.eval == splits.eval and probe.train == []


def test_templates_map_columns_and_missing_columns_are_named(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text("".join(json.dumps({"q": f"q{i}", "ctx": "c", "a": i}) + "\n" for i in range(20)))
    cfg = DomainConfig(
        name="t",
        data=LocalSource(path=str(f)),
        prompt_template="{{ctx}}: {{q}}?",
        answer_template=" {{a * 2}}",
        eval_size=5,
    )
    rows = load_domain(cfg, tmp_path)
    assert {(r["prompt"], r["answer"]) for r in rows.eval + rows.train} == {
        (f"c: q{i}?", f" {2 * i}") for i in range(20)
    }
    bad = cfg.model_copy(update={"prompt_template": "{{ question }}: {{q}}"})
    with pytest.raises(DataError, match=r"^domain t: column\(s\) question not in the data \(columns: q, ctx, a\)"):
        load_domain(bad, tmp_path)


def test_custom_multiple_choice_mapping(tmp_path):
    f = tmp_path / "mc.jsonl"
    rows = [{"stem": "2+2", "options": ["three", "four", "five"], "gold": g} for g in (1, "1", "B", "four")] * 3
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DomainConfig(
        name="mc",
        data=LocalSource(path=str(f)),
        prompt_template="Q: {{stem}}\nA:",
        choices_field="options",
        label_field="gold",
        eval_size=4,
    )
    assert cfg.score.kind == "multiple_choice"
    splits = load_domain(cfg, tmp_path)
    for r in splits.eval + splits.train:
        assert r == {"prompt": "Q: 2+2\nA:", "answer": " four", "choices": ["three", "four", "five"], "label": 1}
    f.write_text(json.dumps({"stem": "x", "options": ["a", "b"], "gold": 7}) + "\n")
    with pytest.raises(DataError, match=r"row 0 .*: gold label 7 is not an index of 2 choices"):
        load_domain(cfg.model_copy(update={"eval_size": 1}), tmp_path, eval_only=True)


def test_empty_data_is_a_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"^domain e: data file .*empty.jsonl is empty; add rows"):
        load_domain(DomainConfig(name="e", data=LocalSource(path=str(empty))), tmp_path)
    schema_only = tmp_path / "none.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), schema_only)
    with pytest.raises(DataError, match=r"^domain e: data file .*none.parquet is empty; add rows"):
        load_domain(DomainConfig(name="e", data=LocalSource(path=str(schema_only))), tmp_path)
    header_only = tmp_path / "header.csv"
    header_only.write_text("prompt,answer\n")
    with pytest.raises(DataError, match=r"^domain e: the data has no rows; check data.path / data.split$"):
        load_domain(DomainConfig(name="e", data=LocalSource(path=str(header_only))), tmp_path)


def test_chat_template_wraps_prompts_when_the_tokenizer_has_one(tmp_path):
    tok = char_tokenizer()
    row = {"prompt": "hi", "answer": "yo"}
    plain = encode(tok, [row], 64)[0]
    assert encode(tok, [{**row, "chat": "auto"}], 64)[0] == plain  # no template: auto leaves the prompt as it is
    with pytest.raises(DataError, match="chat_template is 'always' but the tokenizer has no chat template"):
        encode(tok, [{**row, "chat": "always"}], 64)
    tok.chat_template = (
        "{% for m in messages %}<u>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    )
    chat = encode(tok, [{**row, "chat": "always"}], 64)[0]
    assert tok.decode(chat.input_ids) == "<u>hi<a>yo<eos>"  # the template replaces our BOS
    assert chat.labels[: len("<u>hi<a>")] == [-100] * len("<u>hi<a>")
    cfg = DomainConfig(name="c", data=GeneratorSource(size=30), eval_size=5, chat_template="auto")
    assert all(r["chat"] == "auto" for r in load_domain(cfg, tmp_path).train)


def test_length_grouped_batches_cover_each_example_once_with_less_padding():
    import random

    lengths = [random.Random(i).randint(2, 40) for i in range(512)]
    order = list(range(512))
    random.Random(0).shuffle(order)
    batches = length_grouped(order, lengths, batch_size=8, rng=random.Random(1), megabatch=16)
    assert sorted(j for b in batches for j in b) == list(range(512)) and all(len(b) == 8 for b in batches)

    def padding(bs):
        return sum(len(b) * max(lengths[j] for j in b) - sum(lengths[j] for j in b) for b in bs)

    plain = [order[i : i + 8] for i in range(0, 512, 8)]
    assert padding(batches) < 0.2 * padding(plain)
    assert batches == length_grouped(order, lengths, batch_size=8, rng=random.Random(1), megabatch=16)
    tok = char_tokenizer()
    enc = encode(tok, [{"prompt": "p" * (i % 17), "answer": "a"} for i in range(64)], 64)
    grouped = train_batches(enc, 8, tok.pad_token_id, seed=0, group_by_length=True)
    plain_stream = train_batches(enc, 8, tok.pad_token_id, seed=0)
    tokens = sum(int(next(grouped)["input_ids"].numel()) for _ in range(8))  # one epoch each
    assert tokens < sum(int(next(plain_stream)["input_ids"].numel()) for _ in range(8))


def test_a_hub_dataset_offline_and_not_cached_is_one_line(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE with nothing in the cache (an unreachable hub itself: tests/flows/test_bad_input.py)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here: fail fast, not after retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = DomainConfig(name="hub", data=HubSource(id="no-such-owner/no-such-dataset", split="test"), eval_size=5)
    with pytest.raises(
        DataError,
        match=r"^domain hub: cannot load dataset 'no-such-owner/no-such-dataset' split "
        r"'test': Couldn't reach 'no-such-owner/no-such-dataset' on the Hub",
    ) as e:
        load_domain(cfg, tmp_path)
    assert "\n" not in str(e.value)
