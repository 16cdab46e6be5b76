"""The tiny lineage every flow test runs (a 1-layer Llama built from a config, seconds a stage), as YAML.

One definition instead of a near-copy per test file: ``tiny(*domains, **sections)`` names the
stages' domains (a name from ``DOMAINS`` or a domain's own mapping) and updates any section
(mappings merge key by key; anything else replaces).
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

DOMAINS: dict[str, dict[str, Any]] = {
    "one": {"name": "one", "data": {"kind": "generator", "op": "reverse", "size": 80}, "eval_size": 12},
    "two": {"name": "two", "data": {"kind": "generator", "op": "increment", "size": 80}, "eval_size": 12},
    "three": {
        "name": "three",
        "data": {"kind": "generator", "op": "next", "alphabet": "abcdefghij", "size": 80},
        "eval_size": 12,
    },
}

BASE: dict[str, Any] = {
    "name": "tiny",
    "model": {
        "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_positions": 32},
        "pretrain": {"steps": 20, "lr": 3.0e-3, "batch_size": 16},
    },
    "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    "lalora": {"lambda": 5, "samples": 16, "batch_size": 8},
    "source": {"name": "src", "data": {"kind": "generator", "op": "copy", "size": 80}, "eval_size": 12},
    "training": {"steps": 6, "batch_size": 8, "log_every": 2},
    "evaluation": {"batch_size": 12, "max_new_tokens": 6},
    "tracking": {"experiment": "tiny", "registered_model": "tiny-adapter"},
}


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def tiny_config(*domains: str | dict[str, Any], **sections: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["domains"] = [copy.deepcopy(DOMAINS[d]) if isinstance(d, str) else d for d in domains]
    _merge(data, sections)
    return data


def tiny(*domains: str | dict[str, Any], **sections: Any) -> str:
    """The YAML of the tiny lineage with these domains and section updates."""
    return "# Run: lalora run tiny.yaml\n" + yaml.safe_dump(tiny_config(*domains, **sections), sort_keys=False)


TINY = tiny("one", "two")
ONE_DOMAIN = tiny("one")
