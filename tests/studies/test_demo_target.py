"""The demo's target (studies/demo_target.py) by hand-built matrices, and benchmarks/demo_target.py's exit codes."""

import pytest

from studies.demo_target import check_target


def _metrics(R):
    from lalora import continual_metrics

    m = continual_metrics(R)
    domains = ["source", "a", "b"]
    forgetting = dict(zip(domains[:-1], m.forgetting, strict=True))  # the last stage's domain: none
    return {
        "domains": domains,
        "R": R,
        "forgetting": forgetting,
        "mean_forgetting": sum(m.forgetting) / len(m.forgetting),
    }


def test_demo_target_by_hand():
    plain = _metrics([[0.9, 0.2, 0.1], [0.1, 1.0, 0.1], [0.0, 0.2, 0.9]])  # forgets 0.9 and 0.8: mean 0.85
    good = _metrics([[0.9, 0.2, 0.1], [0.8, 0.85, 0.1], [0.7, 0.6, 0.75]])  # forgets 0.2, 0.25: mean 0.225; 85%, 83%
    check = check_target(plain, good)
    assert check.plain_max_drop == pytest.approx(0.9) and check.plain_mean_forgetting == pytest.approx(0.85)
    assert check.mean_forgetting == pytest.approx(0.225)
    assert check.learned_ratio == pytest.approx({"a": 0.85, "b": 0.75 / 0.9}) and check.met
    slow = _metrics([[0.9, 0.2, 0.1], [0.8, 0.85, 0.1], [0.7, 0.6, 0.7]])  # b: 0.7 / 0.9 < 0.8
    assert not check_target(plain, slow).met
    leaky = _metrics([[0.9, 0.2, 0.1], [0.3, 0.85, 0.1], [0.2, 0.3, 0.9]])  # forgets 0.7, 0.55: over half of 0.85
    assert not check_target(plain, leaky).met
    with pytest.raises(ValueError, match="different domains"):
        check_target(plain, {**good, "domains": ["source", "a", "c"]})


def test_demo_target_script_exit_codes(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "demo_target.py"
    plain = _metrics([[0.9, 0.2, 0.1], [0.1, 1.0, 0.1], [0.0, 0.2, 0.9]])
    runs = {
        "plain": plain,
        "good": _metrics([[0.9, 0.2, 0.1], [0.8, 0.85, 0.1], [0.7, 0.6, 0.75]]),
        "slow": _metrics([[0.9, 0.2, 0.1], [0.8, 0.85, 0.1], [0.7, 0.6, 0.7]]),
    }
    for name, m in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(m))

    def run(*args):
        return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True)

    ok = run(tmp_path / "plain.json", tmp_path / "good.json")
    assert ok.returncode == 0 and ok.stdout.strip().endswith("target met"), ok.stdout + ok.stderr
    slow = run(tmp_path / "plain.json", tmp_path / "slow.json")
    assert slow.returncode == 1 and "stage 2 b: R[2][2] LaLoRA 0.700 / plain 0.900 = 78% (>= 80%: NO)" in slow.stdout
    as_json = json.loads(run(tmp_path / "plain.json", tmp_path / "good.json", "--json").stdout)
    assert as_json["met"] is True and as_json["mean_forgetting"] == pytest.approx(0.225)
    missing = run(tmp_path / "nope.json", tmp_path / "good.json")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1 and "nope.json" in missing.stderr
