"""The evaluate stage: each domain scored by its own scorer on a saved base + adapter, written to eval.json."""

import json

import pytest

from pipelines.config import DomainConfig, EvaluationConfig, GeneratorSource, LocalSource, LoraSettings, TinyModelConfig
from pipelines.data.sources import load_domain
from pipelines.runtime.models import build_tiny_llama, char_tokenizer, load_adapter, load_base, new_adapter
from pipelines.scoring.scorers import score_generate, score_multiple_choice, score_perplexity, target_nll
from pipelines.stages.evaluate import EvaluateInputs, evaluate
from tests.pipelines.test_presets import ARC, TEXT


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    tok = char_tokenizer()
    base = build_tiny_llama(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok, 0)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    new_adapter(base, LoraSettings(r=2, alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(root / "adapter")
    for name, records in (("arc", ARC), ("text", TEXT)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_each_domain_gets_its_scorer_and_eval_json_holds_every_value(saved):
    domains = [
        DomainConfig(
            name="gen",
            data=GeneratorSource(op="reverse", size=40),
            eval_size=6,
            scoring={"kind": "generate", "max_new_tokens": 3},
        ),
        DomainConfig(name="arc", data=LocalSource(path=str(saved / "arc.jsonl")), preset="arc", eval_size=10),
        DomainConfig(name="wiki", data=LocalSource(path=str(saved / "text.jsonl")), preset="text", eval_size=10),
    ]
    cfg = EvaluationConfig(batch_size=4, max_new_tokens=9)
    out = saved / "eval.json"
    scores = evaluate(
        EvaluateInputs(
            base=str(saved / "base"),
            adapter=str(saved / "adapter"),
            domains=tuple(domains),
            evaluation=cfg,
            dtype="float32",
            max_length=32,
            data_dir=str(saved / "data"),
            out_path=str(out),
        )
    )
    on_disk = json.loads(out.read_text())["scores"]
    assert on_disk == {k: v.as_json() for k, v in scores.items()}
    assert {k: (v["scoring"], v["metric"], v["higher_is_better"], v["n"]) for k, v in on_disk.items()} == {
        "gen": ("generate", "accuracy", True, 6),
        "arc": ("multiple_choice", "acc_norm", True, 2),
        "wiki": ("perplexity", "nll", False, 2),
    }
    assert set(on_disk["arc"]) >= {"acc", "acc_norm", "nll", "perplexity"}
    assert on_disk["arc"]["score"] == on_disk["arc"]["acc_norm"]

    base, tok = load_base(str(saved / "base"))
    model = load_adapter(base, str(saved / "adapter")).eval()
    rows = {d.name: load_domain(d, saved / "data", eval_only=True).eval for d in domains}
    # the scoring's limit wins
    gen = score_generate(model, tok, rows["gen"], domains[0].score, batch_size=4, max_new_tokens=3)
    assert on_disk["gen"]["accuracy"] == gen["accuracy"]
    assert on_disk["gen"]["nll"] == pytest.approx(target_nll(model, tok, rows["gen"], 4, 32), rel=1e-6)
    assert on_disk["arc"]["acc"] == score_multiple_choice(model, tok, rows["arc"], batch_size=4)["acc"]
    assert on_disk["wiki"]["nll"] == pytest.approx(
        score_perplexity(model, tok, rows["wiki"], batch_size=4, max_length=32)["nll"], rel=1e-6
    )
