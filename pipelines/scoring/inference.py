"""The model the scorers run: a LoRA adapter merged into its base, and torch's own linear layers.

Merged. A peft LoRA model computes ``W x + s B (A x)`` in every adapted layer: two more matmuls,
a scale, an add and two dtype casts (peft keeps the adapter in float32 beside a bf16 base), which
doubled a decode step on the H200 (HF ``generate``, Llama-3.2-1B shape, 8 x 128 new tokens: 28.7 ms
unmerged, 14.2 ms merged). ``inference_model`` runs the same model with ``W + s B A`` instead,
merged by peft itself into a copy (the caller's model is left as it is), so scoring, a registered
version's pyfunc and ``lalora export --merge`` all run one set of merged weights. Merging rounds
``W + s B A`` to the base's dtype: in float32 the demo's logits move by <= 2.1e-5, its NLL by
<= 1.5e-6 relative, and no greedy completion changes (``tests/pipelines/test_inference.py``). In
bf16 the rounding is the dtype's (2**-8 of a weight, against a small ``s B A``): on the demo in bf16,
6 of 800 greedy completions change and the NLL moves by up to 1.8%, where bf16 itself (unmerged)
moves it by 2.5% from float32.

Torch's linear. Setting up a ZeRO-3 engine (DeepSpeed's ``zero.Init`` with a module) replaces
``torch.nn.functional.linear`` for the rest of the process with a Python ``autograd.Function``
(DeepSpeed says "This will persist unless manually reset"); every linear layer then pays an
``inspect.signature`` and an unfused bias per call. A stage that fine-tuned at ZeRO-3 in this process
(world size 1), or ``benchmarks/gpu_suite.py`` after its ZeRO-3 series, then scored at that cost: on
this CPU 2.1x the time of 8 x 128 greedy tokens, and on the H200 most likely the 107 ms a step the suite
measured against 28.7 ms for the same unmerged model in a fresh process (not re-measured there yet).
``torch_linear`` restores torch's own function while the scorers run.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from pipelines.runtime.models import causal_lm

_MERGED: weakref.WeakKeyDictionary[Any, tuple[tuple[tuple[int, int], ...], Any]] = weakref.WeakKeyDictionary()


def _lora_layers(model: Any) -> list[Any]:
    """The model's LoRA layers when it is a peft model whose only adapters are LoRA and unmerged; else []."""
    if not (hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")):
        return []
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(getattr(cfg, "peft_type", None) != "LORA" for cfg in model.peft_config.values()):
        return []
    tuners = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not tuners or not all(isinstance(m, LoraLayer) and not m.merged for m in tuners):
        return []
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3 partitions: nothing whole to merge
        return []
    return tuners


def _state_key(model: Any) -> tuple[tuple[int, int], ...]:
    """Each parameter's storage and version counter: an optimizer step, ``load_state_dict`` or ``.to()``
    changes it (writes through ``.data`` do not: they are not seen)."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def merged_copy(model: Any) -> Any:
    """``model``'s base with its LoRA adapter merged by peft (``merge_and_unload``), in eval mode; a copy
    that shares every tensor merging leaves alone (embeddings, norms, the adapter), so it costs the adapted
    layers' weights once more. ``model`` itself is unchanged."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("not a peft model with unmerged LoRA adapters only")
    written = {id(t) for m in layers for t in m.get_base_layer().parameters(recurse=False)}
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in written}
    with torch.no_grad():
        return copy.deepcopy(model, memo).merge_and_unload().eval()


def inference_model(model: Any) -> Any:
    """The model scoring runs: a LoRA peft model as its merged copy (made once and kept while the model's
    parameters are unchanged; its generation config is the model's), any other model as it is."""
    if not hasattr(model, "peft_config"):
        return model
    key = _state_key(model)
    hit = _MERGED.get(model)
    if hit is not None and hit[0] == key:
        merged = hit[1]
    elif _lora_layers(model):
        merged = merged_copy(model)
        _MERGED[model] = (key, merged)
    else:
        return model
    merged.generation_config = model.generation_config  # the caller's settings as they are now
    return merged


def merge_in_place(model: Any) -> Any:
    """A LoRA peft model the caller owns, merged into its own base (no copy: the stage's memory stays one
    model); the same weights ``merged_copy`` would give. Any other model as it is."""
    if not _lora_layers(model):
        return model
    with torch.no_grad():
        return model.merge_and_unload().eval()


def forward_params(model: Any) -> set[str]:
    """The keyword arguments the model's (a peft model's base's) forward takes."""
    return set(inspect.signature(causal_lm(model).forward).parameters)


def _is_deepspeed_linear(fn: Any) -> bool:
    return str(getattr(fn, "__module__", "")).startswith("deepspeed.")


@contextmanager
def torch_linear() -> Iterator[None]:
    """``torch.nn.functional.linear`` is torch's own for the duration, where DeepSpeed replaced it."""
    current = torch.nn.functional.linear
    if not _is_deepspeed_linear(current):
        yield
        return
    torch.nn.functional.linear = torch._C._nn.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = current
