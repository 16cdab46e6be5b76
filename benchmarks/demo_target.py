"""Is the demo's target met? Plain LoRA's and LaLoRA's metrics.json of the same lineage, side by side.

    make demo-check                 # runs make demo-lambda0 and make demo, then this
    python benchmarks/demo_target.py runs/demo-lambda0/metrics.json runs/demo/metrics.json [--json]

The target (issue 2): with lambda = 0 some earlier domain's accuracy drops by at least 20
points; with the demo's lambda the mean forgetting is at most half of plain LoRA's, while
each new domain is still learned, R[i][i] at least 80% of plain LoRA's. Exit status 1 when
it is not met.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from studies.demo_target import MIN_LEARNED_RATIO, MIN_PLAIN_DROP, check_target

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plain", type=Path, help="metrics.json of the lambda = 0 run")
    p.add_argument("lalora", type=Path, help="metrics.json of the LaLoRA run")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = p.parse_args()
    try:
        plain, lalora = (json.loads(path.read_text()) for path in (a.plain, a.lalora))
        check = check_target(plain, lalora)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}; give two metrics.json files of `lalora run` on the same config", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps({**asdict(check), "met": check.met, "lambda": lalora.get("lambda")}, indent=2))
        return 0 if check.met else 1
    ok = lambda b: "yes" if b else "NO"  # noqa: E731
    print(
        f"plain LoRA, largest drop of an earlier domain: {check.plain_max_drop:.3f} (>= {MIN_PLAIN_DROP:.2f}: "
        f"{ok(check.plain_forgets)})"
    )
    print(
        f"mean forgetting: plain {check.plain_mean_forgetting:.3f}, LaLoRA (lambda {lalora.get('lambda')}) "
        f"{check.mean_forgetting:.3f} (<= half: {ok(check.forgets_less)})"
    )
    for i, (domain, r) in enumerate(check.learned_ratio.items(), start=1):
        print(
            f"stage {i} {domain}: R[{i}][{i}] LaLoRA {lalora['R'][i][i]:.3f} / plain {plain['R'][i][i]:.3f} = "
            f"{r:.0%} (>= {MIN_LEARNED_RATIO:.0%}: {ok(check.learned(domain))})"
        )
    print("target met" if check.met else "target NOT met")
    return 0 if check.met else 1


if __name__ == "__main__":
    raise SystemExit(main())
