"""Each preset on a small fixture in its dataset's schema (records written here, not copied from the datasets)."""

import json

import pytest

from pipelines.config import DomainConfig, HubSource, LocalSource
from pipelines.data.sources import DataError, load_domain
from tests.pipelines.fixtures import hub_dir

GSM8K = [
    {"question": "Ann has 3 pens and buys 4 more. How many pens?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {
        "question": "A box holds 1,200 nails; 200 are used. How many are left?",
        "answer": "1200 - 200 = 1000\n#### 1,000",
    },
]
METAMATH = [
    {
        "query": "What is 6 times 7?",
        "response": "6 * 7 = 42.\nThe answer is: 42",
        "type": "GSM_Rephrased",
        "original_question": "6 * 7?",
    },
    {
        "query": "Halve 18.",
        "response": "18 / 2 = 9\nThe answer is: 9",
        "type": "MATH_AnsAug",
        "original_question": "18 / 2?",
    },
]
HELLASWAG = [
    {
        "ind": 1,
        "activity_label": "Making tea",
        "ctx_a": "A person fills a kettle with water.",
        "ctx_b": "they",
        "ctx": "unused",
        "endings": [
            "put the kettle on the stove [title] Wait for it to boil.",
            "throw the [step] kettle away.",
            "sing to the kettle.",
            "drink the water cold.",
        ],
        "source_id": "x",
        "split": "val",
        "split_type": "indomain",
        "label": "0",
    },
    {
        "ind": 2,
        "activity_label": "Cycling",
        "ctx_a": "A man checks his tyres.",
        "ctx_b": "",
        "ctx": "unused",
        "endings": ["He rides off.", "He eats the tyre.", "He flies.", "He sleeps."],
        "source_id": "y",
        "split": "val",
        "split_type": "zeroshot",
        "label": "2",
    },
]
ARC = [
    {
        "id": "a1",
        "question": "Which of these is a liquid at room temperature?",
        "choices": {"text": ["iron", "water", "salt"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    },
    {
        "id": "a2",
        "question": "What do plants take in to make food?",
        "choices": {"text": ["carbon dioxide", "sand", "plastic", "gold"], "label": ["1", "2", "3", "4"]},
        "answerKey": "1",
    },
]
WINOGRANDE = [
    {
        "sentence": "The cup fell off the table because _ was too close to the edge.",
        "option1": "the cup",
        "option2": "the table",
        "answer": "1",
    },
    {"sentence": "Sam lent Alex a pen since _ had forgotten one.", "option1": "Sam", "option2": "Alex", "answer": "2"},
]
TEXT = [{"text": ""}, {"text": " = A heading = \n"}, {"text": "   \n"}, {"text": " Some plain prose about rivers . \n"}]


def load(tmp_path, preset, records, **kw):
    f = tmp_path / f"{preset}.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = DomainConfig(name=preset, data=LocalSource(path=str(f)), preset=preset, eval_size=len(records), **kw)
    return cfg, load_domain(cfg, tmp_path / "cache", eval_only=True).eval


def by_prompt(rows):
    return sorted(rows, key=lambda r: (r["prompt"], r["answer"]))


def test_gsm8k_and_metamathqa_use_the_question_answer_format(tmp_path):
    cfg, rows = load(tmp_path, "gsm8k", GSM8K)
    assert cfg.score.kind == "generate" and cfg.score.extractor == "gsm8k" and cfg.score.stop == ["Question:"]
    assert by_prompt(rows) == [
        {
            "prompt": "Question: A box holds 1,200 nails; 200 are used. How many are left?\nAnswer:",
            "answer": " 1200 - 200 = 1000\n#### 1,000",
        },
        {
            "prompt": "Question: Ann has 3 pens and buys 4 more. How many pens?\nAnswer:",
            "answer": " 3 + 4 = <<3+4=7>>7\n#### 7",
        },
    ]
    cfg, rows = load(tmp_path, "metamathqa", METAMATH)
    assert cfg.score.extractor == "regex"
    assert by_prompt(rows) == [
        {"prompt": "Question: Halve 18.\nAnswer:", "answer": " 18 / 2 = 9\nThe answer is: 9"},
        {"prompt": "Question: What is 6 times 7?\nAnswer:", "answer": " 6 * 7 = 42.\nThe answer is: 42"},
    ]


def test_hellaswag_preprocessing_and_labels(tmp_path):
    cfg, rows = load(tmp_path, "hellaswag", HELLASWAG)
    assert cfg.score.kind == "multiple_choice" and cfg.score.metric == "acc_norm"
    assert by_prompt(rows) == [
        {
            "prompt": "Cycling: A man checks his tyres.",
            "answer": " He flies.",
            "label": 2,
            "choices": ["He rides off.", "He eats the tyre.", "He flies.", "He sleeps."],
        },
        {
            "prompt": "Making tea: A person fills a kettle with water. They",
            "answer": " put the kettle on the stove. Wait for it to boil.",
            "label": 0,
            "choices": [
                "put the kettle on the stove. Wait for it to boil.",
                "throw the kettle away.",
                "sing to the kettle.",
                "drink the water cold.",
            ],
        },
    ]


def test_arc_through_a_hub_layout_with_letter_and_digit_keys(tmp_path):
    repo = hub_dir(tmp_path, "ai2_arc", {"ARC-Challenge": {"test": ARC}, "ARC-Easy": {"test": ARC[:1]}})
    cfg = DomainConfig(
        name="arc", data=HubSource(id=str(repo), name="ARC-Challenge", split="test"), preset="arc", eval_size=10
    )
    rows = load_domain(cfg, tmp_path / "cache", eval_only=True).eval
    assert cfg.score.metric == "acc_norm"
    assert by_prompt(rows) == [
        {
            "prompt": "Question: What do plants take in to make food?\nAnswer:",
            "answer": " carbon dioxide",
            "label": 0,
            "choices": ["carbon dioxide", "sand", "plastic", "gold"],
        },
        {
            "prompt": "Question: Which of these is a liquid at room temperature?\nAnswer:",
            "answer": " water",
            "label": 1,
            "choices": ["iron", "water", "salt"],
        },
    ]


def test_winogrande_scores_the_shared_tail_after_each_filled_blank(tmp_path):
    cfg, rows = load(tmp_path, "winogrande", WINOGRANDE)
    assert cfg.score.metric == "acc"
    assert by_prompt(rows) == [
        {
            "prompt": "Sam lent Alex a pen since Alex",
            "answer": " had forgotten one.",
            "label": 1,
            "contexts": ["Sam lent Alex a pen since Sam", "Sam lent Alex a pen since Alex"],
            "choices": ["had forgotten one.", "had forgotten one."],
        },
        {
            "prompt": "The cup fell off the table because the cup",
            "answer": " was too close to the edge.",
            "label": 0,
            "contexts": ["The cup fell off the table because the cup", "The cup fell off the table because the table"],
            "choices": ["was too close to the edge.", "was too close to the edge."],
        },
    ]


def test_text_preset_is_scored_by_perplexity_and_skips_blank_lines(tmp_path):
    cfg, rows = load(tmp_path, "text", TEXT)
    assert cfg.score.kind == "perplexity" and cfg.score.metric == "nll"
    assert by_prompt(rows) == [
        {"prompt": "", "answer": " = A heading = \n"},
        {"prompt": "", "answer": " Some plain prose about rivers . \n"},
    ]


def test_preset_errors_name_the_fix(tmp_path):
    with pytest.raises(
        DataError,
        match=r"column\(s\) answerKey not in the data .*; preset arc reads question, "
        r"choices, answerKey$",
    ):
        load(tmp_path, "arc", [{k: v for k, v in r.items() if k != "answerKey"} for r in ARC])
    with pytest.raises(
        DataError,
        match=r"label '' is not a choice index \(an unlabeled test split\? use the "
        r"validation split\)$",
    ):
        load(tmp_path, "hellaswag", [{**HELLASWAG[0], "label": ""}])
    with pytest.raises(DataError, match="answerKey 'E' is not one of the choice labels"):
        load(tmp_path, "arc", [{**ARC[0], "answerKey": "E"}])
    with pytest.raises(DataError, match="no usable evaluation rows"):
        load(tmp_path, "text", [{"text": ""}, {"text": "  "}])
