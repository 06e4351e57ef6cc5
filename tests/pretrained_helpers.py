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


def write_checkpoint(path, cfg, seed: int = 0, calibrate: bool = False) -> torch.nn.Module:
    """A checkpoint as `train.py` writes it, for a randomly initialised model with non-default buffers; with
    `calibrate`, routed thresholds calibrated to the capacity on random tokens (so causal modes skip tokens)."""
    from sdt.models import build_model
    from sdt.models.calibration import calibrate_thresholds

    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(("threshold", "down_proj.weight")):  # calibrated thresholds, zero-init priors
                t.copy_(torch.rand_like(t) * 0.1 + 0.45)
            elif ".skip_map." in name:  # zero-init skip maps
                t.copy_(torch.randn_like(t) * 0.1)
    if calibrate:
        calibrate_thresholds(
            model, [torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(seed))]
        )
    tokenizer = tiny_tokenizer()
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"model": cfg.to_dict(), "optim": {}},
            "sdt": {"tokenizer": tokenizer.to_json(), "tokenizer_vocab_size": tokenizer.vocab_size, "config": {}},
            "global_step": 7,
        },
        path,
    )
    return model


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


# llama.cpp's tensor names for the parts of a Hugging Face Llama layer.
_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _llama_cpp_permute(w, n_heads: int):
    # llama.cpp's converter reorders q/k rows from rotate_half to interleaved RoPE; transformers undoes it on load.
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, hf_model, extra_tensors: dict | None = None) -> Path:
    """Write a transformers Llama as an fp32 GGUF file, as llama.cpp's converter would (weights and model metadata;
    no tokenizer), plus `extra_tensors` ({gguf name: array}) as they are."""
    import gguf
    import numpy as np

    c = hf_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    for name, tensor in hf_model.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:  # model.layers.<i>.<module path>.weight
            parts = name.split(".")
            module = ".".join(parts[3:-1])
            if module == "self_attn.q_proj":
                array = _llama_cpp_permute(array, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = _llama_cpp_permute(array, c.num_key_value_heads)
            gguf_name = f"blk.{parts[2]}.{_GGUF_LAYER_NAMES[module]}.weight"
        writer.add_tensor(gguf_name, array)
    for gguf_name, array in (extra_tensors or {}).items():
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
