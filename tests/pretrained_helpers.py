"""Tiny random Llama / Qwen2 checkpoints built and saved with `transformers`, with a tokenizer, for transfer tests."""

from __future__ import annotations

from pathlib import Path

import torch

HF_VOCAB = 320  # room for the tiny BPE below (its vocabulary is at most 300)


def hf_config(kind: str, **overrides):
    """A 4-layer GQA config; Qwen2 with q/k/v biases and tied embeddings, Llama untied, distinct theta and eps."""
    from transformers import LlamaConfig, Qwen2Config

    common = {
        "vocab_size": HF_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "initializer_range": 0.1,  # larger than the default 0.02, so logits differ clearly between tokens
    }
    if kind == "qwen2":
        cfg = Qwen2Config(**common, rope_theta=50000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
    elif kind == "llama":
        cfg = LlamaConfig(**common, rope_theta=20000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    else:
        raise ValueError(kind)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_tokenizer():
    from sdt.data import train_bpe

    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20
    return train_bpe([text, "ROMEO:\nBut soft, what light through yonder window breaks?"] * 5, vocab_size=300)


def save_hf_model(directory: Path, kind: str, seed: int = 0, safe_serialization: bool = True, **overrides):
    """Save a random `kind` model (fp32) and a tokenizer into `directory`; returns the transformers model (eval)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, **overrides), dtype=torch.float32).eval()
    with torch.no_grad():  # q/k/v biases start at zero in transformers: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(directory))
    if not safe_serialization:  # transformers 5 writes safetensors only: write the legacy .bin format by hand
        (directory / "model.safetensors").unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    tiny_tokenizer().save(directory)
    return model
