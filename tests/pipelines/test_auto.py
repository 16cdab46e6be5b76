"""lambda auto, the pure part: the validation split, the config, the stage identity, and the search."""

import json

import pytest

from lalora import continual_metrics
from pipelines.config import AutoLambdaConfig, ConfigError, DomainConfig, LineageConfig, load_config
from pipelines.data.sources import load_domain
from pipelines.lineage.auto import Trial, choose, next_lambda, paired_gap, refusal, summary, validation_metrics
from pipelines.lineage.plan import stage_keys

FP = {"source": "s0", "a": "a0", "b": "b0"}


def cfg(**sections):
    return LineageConfig.model_validate({"domains": [{"name": "a"}, {"name": "b"}], **sections})


def _ids(rows):
    return [json.dumps(r, sort_keys=True) for r in rows]


def _unique_rows(path, n):
    path.write_text("".join(json.dumps({"prompt": f"q{i}=", "answer": f"a{i}"}) + "\n" for i in range(n)))
    return {"kind": "local", "path": str(path)}


def test_the_validation_split_is_disjoint_from_train_curvature_and_eval_and_stable(tmp_path):
    domain = DomainConfig(
        name="d", data=_unique_rows(tmp_path / "d.jsonl", 400), eval_size=50, val_size=40, curvature_size=30
    )
    a = load_domain(domain, tmp_path)
    b = load_domain(domain, tmp_path / "again")
    assert (len(a.eval), len(a.val), len(a.train)) == (50, 40, 310)
    ev, val, train, curv = map(set, (_ids(a.eval), _ids(a.val), _ids(a.train), _ids(a.curvature)))
    assert len(ev | val | train) == 400 and not (ev & val or ev & train or val & train)  # disjoint, every row used
    assert curv <= train and not curv & val  # curvature is training data (the training posterior's)
    assert (_ids(a.val), _ids(a.train), a.fingerprint) == (_ids(b.val), _ids(b.train), b.fingerprint)  # fixed
    other_seed = load_domain(domain.model_copy(update={"split_seed": 1}), tmp_path / "seed")
    assert _ids(other_seed.val) != _ids(a.val)
    # a domain without val_size keeps the splits (and fingerprint) it had: the same evaluation rows, no validation
    plain = load_domain(domain.model_copy(update={"val_size": None}), tmp_path / "plain")
    assert _ids(plain.eval) == _ids(a.eval) and plain.val == [] and len(plain.train) == 350
    assert plain.fingerprint != a.fingerprint
    probe = load_domain(domain, tmp_path / "probe", eval_only=True)  # a probe's validation rows too
    assert _ids(probe.val) == _ids(a.val) and probe.train == []


def test_validation_rows_from_the_training_source_when_eval_data_is_separate(tmp_path):
    domain = DomainConfig(
        name="d",
        data=_unique_rows(tmp_path / "d.jsonl", 100),
        eval_data={"data": {"kind": "generator", "op": "copy", "size": 30}},
        eval_size=30,
        val_size=20,
    )
    s = load_domain(domain, tmp_path)
    assert (len(s.eval), len(s.val), len(s.train)) == (30, 20, 80)
    assert not set(_ids(s.val)) & set(_ids(s.train))
    assert _ids(load_domain(domain, tmp_path, eval_only=True).val) == _ids(s.val)


def test_auto_gives_every_scored_domain_validation_rows_and_needs_a_budget():
    searching = cfg(lalora={"lambda": "auto", "auto": {"max_forgetting": 0.1}}, probes=[{"name": "p"}])
    assert searching.searches and searching.budget == 0.1
    assert [d.val_size for d in searching.eval_domains] == [100, 100, 100, 100]
    again = LineageConfig.model_validate(searching.as_json())  # what a launched rank reads
    assert [d.val_size for d in again.eval_domains] == [100] * 4
    assert cfg(lalora={"lambda": "auto"}, promotion={"max_forgetting": 0.3}).budget == 0.3  # the gate's
    fixed = cfg()
    assert not fixed.searches and [d.val_size for d in fixed.eval_domains] == [None] * 3
    one = cfg(domains=[{"name": "a"}, {"name": "b", "lambda": "auto"}], lalora={"auto": {"max_forgetting": 0.1}})
    assert one.searches and one.stage_lambda(1) == 10.0 and one.stage_lambda(2) == "auto"


@pytest.mark.parametrize(
    "yaml_text,fragment",
    [
        ("lalora: {lambda: auto}\n", "lambda auto needs a forgetting budget: set lalora.auto.max_forgetting"),
        ("lalora: {lambda: fast}\n", "lalora.lambda: must be a number >= 0 or 'auto', got 'fast'"),
        ("lalora: {lambda: -1}\n", "lalora.lambda: Input should be greater than or equal to 0"),
        (
            "lalora: {lambda: auto, auto: {max_forgetting: 0.1, min_lambda: 5, max_lambda: 1}}\n",
            "min_lambda (5) must be below max_lambda (1)",
        ),
        ("source: {name: s, lambda: 3}\n", "source s: lambda can only be set on a stage's domain"),
        ("probes: [{name: p, steps: 3}]\n", "probes p: steps can only be set on a stage's domain"),
    ],
)
def test_auto_settings_that_cannot_work_are_one_line_each(tmp_path, yaml_text, fragment):
    path = tmp_path / "c.yaml"
    path.write_text("domains: [{name: a}]\n" + yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert fragment in str(e.value) and len(e.value.errors) == 1, e.value.errors


def test_a_domains_own_settings_are_part_of_its_stages_identity_only_when_set():
    base = stage_keys(cfg(), FP)
    assert stage_keys(cfg(domains=[{"name": "a"}, {"name": "b", "val_size": None, "lambda": None}]), FP) == base
    own = stage_keys(cfg(domains=[{"name": "a"}, {"name": "b", "lambda": 2, "steps": 7, "lr": 1e-3}]), FP)
    assert own[0] == base[0] and own[1] != base[1]
    searching = cfg(domains=[{"name": "a"}, {"name": "b", "lambda": "auto"}], lalora={"auto": {"max_forgetting": 0.1}})
    keys = stage_keys(searching, FP)
    assert keys[1] != base[1]
    # the search's settings: part of the stage that searches, not of a fixed stage before it (its data splits are
    # another matter: validation rows change what trains, so the data fingerprints differ anyway)
    budget = cfg(domains=[{"name": "a"}, {"name": "b", "lambda": "auto"}], lalora={"auto": {"max_forgetting": 0.2}})
    assert stage_keys(budget, FP)[0].config_sha256 == keys[0].config_sha256
    assert stage_keys(budget, FP)[1].config_sha256 != keys[1].config_sha256


def test_a_stages_training_settings_and_lambda_resolve_from_its_domain():
    c = cfg(domains=[{"name": "a", "steps": 7, "lr": 1e-3, "lambda": 0}, {"name": "b"}])
    assert (c.stage_training(1).steps, c.stage_training(1).lr, c.stage_lalora(1).lam) == (7, 1e-3, 0.0)
    assert (c.stage_training(2).steps, c.stage_lalora(2).lam) == (300, 10.0)
    trial = cfg(lalora={"lambda": "auto", "auto": {"max_forgetting": 0.1}}).with_stage(2, lam=3.5, steps=40)
    assert trial.stage_lalora(2).lam == 3.5 and trial.stage_training(2).steps == 40
    with pytest.raises(ValueError, match="searches its lambda"):
        cfg(lalora={"lambda": "auto", "auto": {"max_forgetting": 0.1}}).stage_lalora(1)


def _trial(k, lam, forgetting, learning=0.5):
    return Trial(k, lam, 10, learning, {"src": forgetting}, 1.0, f"/a/{k}")


AUTO = AutoLambdaConfig(min_lambda=0.01, max_lambda=100.0, max_trials=6, resolution=1.5)


def test_the_search_brackets_then_bisects_on_a_log_scale_towards_the_least_penalty_within_budget():
    # forgetting falls with lambda: within 0.1 from lambda 2 up
    def forgets(lam):
        return 0.05 if lam >= 2 else 0.3

    trials = []
    while (lam := next_lambda(trials, AUTO, 0.1, warm=None)) is not None:
        trials.append(_trial(len(trials) + 1, lam, forgets(lam), learning=1 / (1 + lam)))
    lams = [t.lam for t in trials]
    assert lams[0] == pytest.approx(1.0)  # the range's geometric middle: over the budget
    assert lams[1] == pytest.approx(10.0)  # a decade up: within it; then bisection between 1 and 10
    assert lams[2] == pytest.approx(10**0.5) and lams[3] == pytest.approx(10**0.25)
    assert lams[4] == pytest.approx(10**0.375) and len(trials) == 5  # 10**0.375 / 10**0.25 < 1.5: done
    chosen, ok = choose(trials, 0.1)
    assert ok and chosen.lam == min(x for x in lams if x >= 2)  # the least penalty within the budget learns most


def test_the_search_stops_early_at_either_end_and_starts_warm():
    within = [_trial(1, 0.05, 0.0)]
    assert next_lambda(within, AUTO, 0.1, warm=0.05) == pytest.approx(0.01)  # a decade down, clipped to the range
    within.append(_trial(2, 0.01, 0.0))
    assert next_lambda(within, AUTO, 0.1, warm=0.05) is None  # nothing learns more than the least penalty
    assert next_lambda([_trial(1, 5.0, 0.5)], AUTO, 0.1, warm=5.0) == pytest.approx(50.0)  # a decade up
    over = [_trial(1, 5.0, 0.5), _trial(2, 50.0, 0.45), _trial(3, 100.0, 0.4)]
    assert next_lambda(over[:2], AUTO, 0.1, warm=5.0) == 100.0  # clipped to the top
    assert next_lambda(over, AUTO, 0.1, warm=5.0) is None  # the most penalty is over the budget too: no lambda meets it
    chosen, ok = choose(over, 0.1)
    assert not ok and chosen.lam == 100.0  # the smallest forgetting reached
    line = refusal(over, chosen, 0.1, AUTO)
    assert line.startswith(
        "no lambda in [0.01, 100] keeps validation forgetting within 0.1: the smallest reached "
        "was 0.400 (src, lambda 100) after 3 trial(s)"
    )
    assert next_lambda([], AUTO, 0.1, warm=1e6) == 100.0  # a warm start outside the range is clipped to it
    assert next_lambda([_trial(k, 1.0 + k, 0.0) for k in range(6)], AUTO, 0.1, warm=None) is None  # max_trials


def test_validation_metrics_are_the_gates_forgetting_and_learning():
    columns = ["src", "a", "b", "probe"]
    rows = [{"src": 0.9, "a": 0.2, "b": 0.1, "probe": 0.5}, {"src": 0.7, "a": 0.9, "b": 0.2, "probe": 0.6}]
    trial = {"src": 0.6, "a": 0.8, "b": 0.7, "probe": 0.55}
    learning, forgetting = validation_metrics(columns, 2, rows, trial, [True] * 4)
    m = continual_metrics([[r[c] for c in columns] for r in [*rows, trial]])
    assert learning == pytest.approx(0.5) == pytest.approx(m.learning[-1])
    assert forgetting == pytest.approx({"src": 0.3, "a": 0.1, "probe": 0.05})  # from each column's best earlier row


def test_the_budget_can_name_the_columns_it_bounds():
    """lalora.auto.columns: only the named columns' forgetting decides feasibility; the others are recorded."""
    named = cfg(lalora={"lambda": "auto", "auto": {"max_forgetting": 0.1, "columns": ["source"]}})
    assert named.lalora.auto.columns == ["source"]
    with pytest.raises(
        ValueError,
        match=r"lalora.auto.columns: nowhere is not a column of this lineage; choose from "
        r"source, a, b",
    ):
        cfg(lalora={"lambda": "auto", "auto": {"max_forgetting": 0.1, "columns": ["nowhere"]}})
    trial = Trial(1, 2.0, 10, 0.5, {"source": 0.05, "a": 0.4}, 1.0, "/a/1", budgeted=["source"])
    assert trial.feasible(0.1) and trial.max_forgetting == 0.05 and trial.worst == "source"
    everything = Trial.from_json({**trial.as_json(), "budgeted": []})
    assert not everything.feasible(0.1) and everything.worst == "a"
    old = trial.as_json()
    old.pop("budgeted")  # trials.json written before the setting: every column bounded
    assert Trial.from_json(old).max_forgetting == 0.4
    # unset, the setting leaves the identity of a searching stage as it was
    searching = cfg(domains=[{"name": "a"}, {"name": "b", "lambda": "auto"}], lalora={"auto": {"max_forgetting": 0.1}})
    columns = cfg(
        domains=[{"name": "a"}, {"name": "b", "lambda": "auto"}],
        lalora={"auto": {"max_forgetting": 0.1, "columns": ["a"]}},
    )
    from pipelines.lineage.plan import stage_config

    assert "columns" not in stage_config(searching, 2)["lalora"]["auto"]
    assert stage_keys(columns, FP)[1] != stage_keys(searching, FP)[1]


def test_the_budget_is_stated_in_validation_rows_and_a_budget_of_one_row_is_named():
    """``lalora validate`` and each search's first log line: the budget as rows of each budgeted accuracy column;
    under 2 rows a row flipping by chance decides a trial (the study's 0.02 on 50 capitals is one row)."""
    from pipelines.lineage.preflight import budget_line

    assert budget_line(cfg()) is None  # nothing searches
    fine = cfg(lalora={"lambda": "auto", "auto": {"max_forgetting": 0.1}})
    assert budget_line(fine) == (
        "lambda auto: the forgetting budget 0.1 in validation rows: source 10 of 100, a 10 of 100, b 10 of 100"
    )
    coarse = cfg(
        lalora={"lambda": "auto", "auto": {"max_forgetting": 0.02, "columns": ["source", "a"]}},
        source={"name": "source", "val_size": 50},
        domains=[{"name": "a", "scoring": {"kind": "perplexity", "metric": "nll"}}, {"name": "b"}],
    )  # a is scored by NLL (no rows to count), b is not budgeted
    assert budget_line(coarse) == (
        "lambda auto: the forgetting budget 0.02 in validation rows: source 1 of 50; one row is over half the budget "
        "(source 100%): a row flipping by chance, not lambda, decides a trial there; raise val_size or the budget"
    )


def _rows_trial(k, lam, forgetting, rows):
    """A trial whose learning is the mean of its per-row validation gains (the row before it scored 0)."""
    return Trial(k, lam, 10, sum(rows) / len(rows), {"src": forgetting}, 1.0, f"/a/{k}", learning_rows=list(rows))


def test_one_se_takes_the_most_penalty_within_one_paired_standard_error_of_the_most_learning():
    base = [0.2, 0.5, 0.1, 0.4, 0.3, 0.6, 0.2, 0.5]
    most = _rows_trial(1, 0.01, 0.0, [b + 0.02 for b in base])
    # 0.3 learns 0.01 less, row by row 0.04 either side of that: the gap's standard error is 0.015
    near = _rows_trial(2, 0.3, 0.0, [b + 0.01 + (0.04 if i % 2 else -0.04) for i, b in enumerate(base)])
    far = _rows_trial(3, 3.0, 0.0, [b - 0.2 for b in base])  # learns 0.22 less on every row: clearly less
    over = _rows_trial(4, 30.0, 0.5, [b + 0.02 for b in base])  # learns as much but is over the budget
    gap, se = paired_gap(most, near)
    assert gap == pytest.approx(0.01) and 0.01 < se < 0.02
    assert paired_gap(most, far) == pytest.approx((0.22, 0.0), abs=1e-12)
    trials = [most, near, far, over]
    assert choose(trials, 0.1)[0] is most  # most_learning, the default: the least penalty here
    assert choose(trials, 0.1, "one_se") == (near, True)  # the most penalty within one standard error
    # unpaired: only the most learning's own trial is within it (trials recorded before the rows were kept)
    legacy = [Trial.from_json({k: v for k, v in t.as_json().items() if k != "learning_rows"}) for t in trials]
    assert choose(legacy, 0.1, "one_se")[0].index == 1 and paired_gap(legacy[0], legacy[1]) is None
    # none feasible: the one that forgot least, whichever the rule
    assert choose([over], 0.1, "one_se") == (over, False)
    assert summary(trials, near, True, 0.1, 10, "one_se")["choice"] == "one_se"


def test_the_choice_rule_is_part_of_a_searching_stages_identity_only_when_not_the_default():
    from pipelines.lineage.plan import stage_config

    def searching(**auto):
        domains = [{"name": "a"}, {"name": "b", "lambda": "auto"}]
        return cfg(domains=domains, lalora={"auto": {"max_forgetting": 0.1, **auto}})

    assert "choice" not in stage_config(searching(), 2)["lalora"]["auto"]
    assert stage_keys(searching(choice="most_learning"), FP) == stage_keys(searching(), FP)
    assert stage_keys(searching(choice="one_se"), FP)[1] != stage_keys(searching(), FP)[1]
    assert stage_keys(searching(choice="one_se"), FP)[0] == stage_keys(searching(), FP)[0]  # stage 1 searches nothing
    with pytest.raises(ValueError, match="most_learning"):
        searching(choice="safest")
