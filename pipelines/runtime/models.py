"""Base models, tokenizers and LoRA adapters: built, saved and loaded the transformers/peft way."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

from lalora.checkpoint import file_sha256
from pipelines.config import LoraSettings, ModelConfig, TinyModelConfig
from pipelines.errors import BadInput, expand_user

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHAR_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def char_tokenizer() -> Any:
    """A character-level fast tokenizer over printable ASCII: needs no download, decodes exactly."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(CHAR_SPECIALS + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def build_tiny_llama(cfg: TinyModelConfig, tokenizer: Any, seed: int) -> Any:
    """A randomly initialised Llama of the configured shape, sized for the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # the initialisation's own seed; the process's RNG is left alone
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


class ModelError(BadInput):
    """A base model or adapter that cannot be used (the message names the setting to fix)."""


def is_local_path(path: str) -> bool:
    """Whether ``from_pretrained`` should read ``path`` from disk: it exists, or is written as a path
    (absolute, ``./``, ``../``, ``~``, or more than one ``/``; a hub id is ``name`` or ``namespace/name``)."""
    return path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or Path(path).exists()


def model_path_problem(path: str) -> str | None:
    """Why a local ``model.path`` cannot be a transformers model directory, or None."""
    if not is_local_path(path):
        return None
    p = expand_user(path, "model.path")
    if not p.exists():
        return (
            f"model.path {path}: no such directory; point it at a directory written by save_pretrained "
            "(config.json, tokenizer files, *.safetensors) or give a hub id such as HuggingFaceTB/SmolLM2-135M"
        )
    if not p.is_dir():
        return f"model.path {path}: is a file, not a model directory (the directory holding config.json)"
    if not (p / "config.json").is_file():
        return (
            f"model.path {path}: holds no config.json, so it is not a transformers model directory "
            "(write one with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR))"
        )
    return None


WEIGHTS_FILE = "model.safetensors"


def weights_problem(path: str, sha256: str) -> str | None:
    """Why the local model at ``path`` is not the one ``model.sha256`` names, or None."""
    if not is_local_path(path):
        return (
            f"model.sha256 is checked against a local directory's {WEIGHTS_FILE}; {path} is a hub id (drop "
            "model.sha256, or download the model and point model.path at it)"
        )
    weights = expand_user(path, "model.path") / WEIGHTS_FILE
    if not weights.is_file():
        return (
            f"model.sha256: {path} holds no {WEIGHTS_FILE} to check (a sharded model cannot be checked; drop "
            "model.sha256)"
        )
    found = file_sha256(weights)
    if found != sha256:
        return (
            f"model.sha256: {weights} has sha256 {found}, not the configured {sha256}: the base is not the one "
            "the config names (restore it, e.g. git checkout of the file, or set model.sha256 to the new value)"
        )
    return None


def load_base(path: str | Path, dtype: str = "float32", revision: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) via from_pretrained: a hub id (at ``revision``) or a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    problem = model_path_problem(str(path))
    if problem:
        raise ModelError(problem)
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), revision=revision)
        # safetensors only: a pickled checkpoint (pytorch_model.bin) can run code when loaded
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=_DTYPES[dtype], use_safetensors=True, revision=revision
        )
    except OSError as e:
        where = (
            ""
            if is_local_path(str(path))
            else (" (a hub id: check it and the network; HF_HUB_OFFLINE=1 reads only the local cache)")
        )
        raise ModelError(f"cannot load base model {path}{where}: {str(e).strip().splitlines()[0]}") from None
    model.config.use_cache = True
    return model, tokenizer


def hub_revision(model_id: str) -> str | None:
    """The commit a hub id resolves to (from the local cache or the hub); None when it cannot be known."""
    from transformers import AutoConfig

    try:
        return getattr(AutoConfig.from_pretrained(model_id), "_commit_hash", None)
    except (OSError, ValueError):
        return None


def meta_model(cfg: ModelConfig) -> Any | None:
    """The base model's modules on the meta device (no weights read or allocated): the tiny Llama of the
    config, or ``from_config`` of the model's config.json; None for a hub model not in the local cache."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        if not cfg.path:
            return build_tiny_llama(cfg.tiny, char_tokenizer(), seed=0)
        try:
            config = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
        except (OSError, ValueError):
            if is_local_path(cfg.path):
                raise ModelError(
                    model_path_problem(cfg.path) or f"model.path {cfg.path}: config.json is unreadable"
                ) from None
            return None
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:  # transformers: no causal-LM class for this config
            raise ModelError(
                f"model.path {cfg.path}: its config.json describes a {getattr(config, 'model_type', '?')!r} model, "
                "which is not a causal language model (AutoModelForCausalLM cannot build it); point model.path at a "
                "causal LM such as a Llama, Qwen or SmolLM2 directory"
            ) from None
        except RuntimeError as e:  # torch: the config's sizes cannot make tensors (a negative or zero dimension)
            raise ModelError(f"model.path {cfg.path}: its config.json cannot build a model: {e}") from None


def unmatched_targets(model: Any, targets: list[str]) -> str | None:
    """Why ``lora.target_modules`` cannot adapt ``model`` (names that match no module), or None."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in targets if t not in present]
    if not unknown:
        return None
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    return (
        f"lora.target_modules {unknown} match no module of the base model; its linear layers are: "
        f"{', '.join(linear[:12])}"
    )


def new_adapter(base: Any, cfg: LoraSettings) -> Any:
    """A freshly initialised LoRA adapter (B = 0: the model equals the base)."""
    from peft import LoraConfig, get_peft_model

    problem = unmatched_targets(base, list(cfg.target_modules))
    if problem:
        raise ModelError(problem)
    with torch.random.fork_rng(devices=[]):  # peft draws A from the global RNG: seeded here, restored after
        torch.manual_seed(cfg.init_seed)
        # peft annotates lora_alpha as int; the scale alpha / r takes a float alpha as written
        return get_peft_model(
            base,
            LoraConfig(
                r=cfg.r,
                lora_alpha=cfg.alpha,  # type: ignore[arg-type]
                lora_dropout=cfg.dropout,
                target_modules=list(cfg.target_modules),
                task_type="CAUSAL_LM",
            ),
        )


def causal_lm(model: Any) -> Any:
    """The transformers model inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_adapter(base: Any, adapter_dir: str | Path, trainable: bool = False) -> Any:
    """A peft model from ``save_pretrained`` output on top of ``base``."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise ModelError(f"adapter {adapter_dir} has no adapter_model.safetensors; pickled adapters are not loaded")
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) tensors of a peft model by state-dict name, checked whole: a ZeRO-3 engine leaves
    partitioned parameters empty, and peft would save such an adapter without complaint."""
    state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    empty = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and tuple(p.shape) != tuple(getattr(p, "ds_shape", p.shape))
    ]
    if empty or not state:
        raise RuntimeError(f"the adapter's parameters are not whole (ZeRO-3 partitions: {empty[:3]}); not saved")
    return state


def load_for_inference(
    base_path: str | Path, adapter_dir: str | Path, dtype: str = "float32", revision: str | None = None
) -> tuple[Any, Any]:
    """(peft model in eval mode, on the GPU when there is one; tokenizer): what scoring and serving run."""
    base, tokenizer = load_base(base_path, dtype, revision)
    model = load_adapter(base, adapter_dir).eval()
    if torch.cuda.is_available():
        model.to("cuda")
    return model, tokenizer


def export_adapter(
    adapter_dir: str | Path, base: str, out: Path, revision: str | None = None, base_name: str | None = None
) -> None:
    """A peft adapter folder (adapter_config.json, adapter_model.safetensors) with the base's tokenizer, as
    peft, vLLM's LoRA serving and TGI load it; its config names ``base_name`` (default ``base``) as the base."""
    import json
    import shutil

    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name or base
    if revision:
        config["revision"] = revision
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    shutil.copy2(Path(adapter_dir) / "adapter_model.safetensors", out / "adapter_model.safetensors")
    AutoTokenizer.from_pretrained(base, revision=revision).save_pretrained(out)


def export_merged(
    base: str, adapter_dir: str | Path, out: Path, dtype: str = "float32", revision: str | None = None
) -> None:
    """A standalone transformers model: the adapter merged into the base weights (``merge_and_unload``),
    safetensors, tokenizer and generation config; ``AutoModelForCausalLM.from_pretrained(out)`` loads it
    without peft."""
    model, tokenizer = load_base(base, dtype, revision)
    merged = load_adapter(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
