"""Built-in data generators: small symbolic domains that need no download.

``symbol-ops`` draws strings over an alphabet and applies a transformation; the prompt
names the operation (``"next abc="``) and the answer is the transformed string (``"bcd"``).
Domains over different operations and alphabets give a lineage in which plain LoRA
measurably forgets: a tiny model learns each in a few hundred steps.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from pipelines.config import GeneratorSource


def _shift(alphabet: str, k: int) -> Callable[[str], str]:
    return lambda s: "".join(alphabet[(alphabet.index(c) + k) % len(alphabet)] for c in s)


def _digitwise(f: Callable[[int], int]) -> Callable[[str], str]:
    return lambda s: "".join(str(f(int(c)) % 10) for c in s)


def symbol_ops(cfg: GeneratorSource, seed: int) -> list[dict[str, str]]:
    """``cfg.size`` examples ``{"prompt": "<op> <s>=", "answer": f(s)}``, reproducible from ``seed``."""
    ops: dict[str, Callable[[str], str]] = {
        "copy": lambda s: s,
        "reverse": lambda s: s[::-1],
        "next": _shift(cfg.alphabet, 1),
        "previous": _shift(cfg.alphabet, -1),
        "rotate": lambda s: s[1:] + s[:1],
        "double": _digitwise(lambda d: 2 * d),
        "increment": _digitwise(lambda d: d + 1),
    }
    names = cfg.op if isinstance(cfg.op, list) else [cfg.op]
    rng = random.Random(f"{','.join(names)}:{cfg.alphabet}:{seed}")
    rows = []
    for _ in range(cfg.size):
        op = rng.choice(names)
        s = "".join(rng.choice(cfg.alphabet) for _ in range(rng.randint(cfg.min_len, cfg.max_len)))
        rows.append({"prompt": f"{op} {s}=", "answer": ops[op](s)})
    return rows


GENERATORS: dict[str, Callable[[GeneratorSource, int], list[dict[str, str]]]] = {"symbol-ops": symbol_ops}
