"""Finding the LoRA matrices of a peft model, under stable names.

Names are the adapted module's path with the wrappers stripped (a DeepSpeed engine's
``module.`` and peft's ``base_model.model.``), followed by ``.lora_A`` or ``.lora_B``. They are
the keys of every precision and checkpoint, so a precision computed on a bare peft model
applies unchanged to the same model inside a DeepSpeed engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

from torch import nn

_WRAPPER_PREFIXES = ("module.", "base_model.model.")


@dataclass(frozen=True)
class LoraParam:
    """One LoRA matrix: A_m is (r, d_in), B_m is (d_out, r)."""

    name: str
    kind: Literal["A", "B"]
    param: nn.Parameter
    module: nn.Linear


def canonical_name(module_path: str) -> str:
    """Strip engine and peft wrapper prefixes from a module path."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if module_path.startswith(prefix):
                module_path = module_path[len(prefix) :]
                changed = True
    return module_path


def lora_parameters(model: nn.Module, adapter_name: str = "default") -> list[LoraParam]:
    """All LoRA matrices of ``adapter_name`` in module order, A before B for each module.

    Works on a peft model, its base model, or a DeepSpeed engine wrapping either.
    Raises ValueError when the model carries no LoRA adapter of that name.
    """
    found: list[LoraParam] = []
    for path, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        lora_b = getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
            continue
        if adapter_name not in lora_a:
            continue
        base = canonical_name(path)
        # peft's LoRA matrices of a linear layer are linear layers, their weights parameters
        a, b = cast(nn.Linear, lora_a[adapter_name]), cast(nn.Linear, lora_b[adapter_name])
        found.append(LoraParam(f"{base}.lora_A", "A", cast(nn.Parameter, a.weight), a))
        found.append(LoraParam(f"{base}.lora_B", "B", cast(nn.Parameter, b.weight), b))
    if not found:
        raise ValueError(f"model has no LoRA adapter named {adapter_name!r}; wrap it with peft.get_peft_model first")
    return found


def matrix_kind(name: str) -> Literal["A", "B"]:
    """'A' or 'B' from a canonical LoRA parameter name."""
    if name.endswith(".lora_A"):
        return "A"
    if name.endswith(".lora_B"):
        return "B"
    raise ValueError(f"{name!r} is not a LoRA matrix name (expected a '.lora_A' or '.lora_B' suffix)")
