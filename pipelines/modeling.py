"""Base models, tokenizers and LoRA adapters: built, saved and loaded the transformers/peft way."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

from pipelines.config import LoraSettings, TinyModelConfig

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
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def build_tiny_llama(cfg: TinyModelConfig, tokenizer: Any, seed: int) -> Any:
    """A randomly initialised Llama of the configured shape, sized for the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_base(path: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) via from_pretrained: a hub id or a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        # safetensors only: a pickled checkpoint (pytorch_model.bin) can run code when loaded
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_DTYPES[dtype], use_safetensors=True)
    except OSError as e:
        raise ValueError(f"cannot load base model {path}: {str(e).splitlines()[0]}") from None
    model.config.use_cache = True
    return model, tokenizer



def new_adapter(base: Any, cfg: LoraSettings) -> Any:
    """A freshly initialised LoRA adapter (B = 0: the model equals the base)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    unknown = [t for t in cfg.target_modules if t not in present]
    if unknown:
        raise ValueError(f"lora.target_modules {unknown} match no module of the base model; "
                         f"linear layers it has include: {sorted(n for n in present if n.endswith('proj'))[:8]}")
    torch.manual_seed(cfg.init_seed)
    return get_peft_model(base, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                           target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))


def load_adapter(base: Any, adapter_dir: str | Path, trainable: bool = False) -> Any:
    """A peft model from ``save_pretrained`` output on top of ``base``."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise ValueError(f"adapter {adapter_dir} has no adapter_model.safetensors; pickled adapters are not loaded")
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
