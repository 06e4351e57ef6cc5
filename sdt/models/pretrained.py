"""Transfer from pretrained Llama / Qwen2 checkpoints (docs/algorithms.md, section 14; docs/pretrained.md), and the name mapping exports write back.

`model.init_from` names a checkpoint in one of three forms:
- a local Hugging Face model directory: `config.json` and `*.safetensors` (or `pytorch_model*.bin`) weights;
- a single `.gguf` file (llama.cpp format, possibly quantised): read and dequantised to fp32 by `transformers`,
  which needs the `gguf` and `accelerate` packages (`pip install "sdt[pretrained]"`);
- a hub id such as `Qwen/Qwen2.5-0.5B`: downloaded with `huggingface_hub`, then read as a local directory.

The backbone's dimensions, RoPE theta, norm eps, tied embeddings, qkv bias and vocabulary come from the checkpoint's
config; routing options (arch, capacity, gates, ...) stay the user's. Weights map by name: the i-th pretrained layer
goes to the i-th backbone `Block` of our stack, in order. So a dense model takes layer i as `layers.i.block`; an SDT
pair j takes layer 2j as its `decision` block and layer 2j+1 as its `dynamic` block; STT and MoD layers keep their
own layer's weights. Nothing is dropped and nothing is left fresh: a checkpoint whose weights do not fill every
backbone tensor exactly is an error that lists the missing and unexpected names.

New modules keep their own initialisation (`reset_routing_parameters`): priors and transition networks have a zero
output projection, so their prediction is 0 at step 0; routers and students are small random MLPs; gate scalars
start at their configured values. With `capacity=1.0` and `ste` gates every token runs every block at full value,
so the transferred SDT/STT model computes exactly the pretrained logits at step 0 (tests/models/test_pretrained.py).

An `sdt` export (`python -m sdt.export`) is read back the same way: the full model config is under the `sdt` key of
`config.json`. A dense export is a plain Llama/Qwen2 checkpoint (Hugging Face names). A routed export stores the
package's own names under `model.` (what its shipped `LanguageModel` loads, sdt/transformers_code/), marked by
`"sdt_weight_names": "package"` in `config.json`; routed exports written before that stored the backbone under Hugging
Face names and the routing tensors under names prefixed `sdt.`. Both read into the same model: package names are
mapped to those names first (`hf_names_of_package_weights`), with the export's own stack as the map.

This module is plain PyTorch plus file formats: the tokenizer is loaded by the caller from `tokenizer_source()`.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from sdt.blocks.layers import Block
from sdt.common.errors import UserError
from sdt.models import build_model
from sdt.models.config import ModelConfig

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
ROUTED_MODEL_TYPE = "sdt"  # config.json model_type of a routed export (its backbone keys are Llama's)
SDT_CONFIG_KEY = "sdt"  # config.json key under which an export stores our full ModelConfig
ROUTING_PREFIX = "sdt."  # export weight names of routing tensors (priors, routers, gate scalars, thresholds)
# config.json key of a routed export that names its weights' layout; "package": `model.` + LanguageModel's own names.
# Routed exports without it (written before) use Hugging Face backbone names and ROUTING_PREFIX.
WEIGHT_NAMES_KEY = "sdt_weight_names"
PACKAGE_WEIGHT_NAMES = "package"
PACKAGE_PREFIX = "model."  # the wrapper's attribute that holds the LanguageModel (SDTForCausalLM.model)
# Fields of ModelConfig that describe the backbone and therefore come from the checkpoint.
BACKBONE_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "intermediate_size",
    "max_seq_len",
    "rope_theta",
    "rms_norm_eps",
    "qkv_bias",
    "tie_embeddings",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class PretrainedSource:
    """Where a checkpoint lives on disk once resolved."""

    spec: str  # what the user wrote in model.init_from
    directory: str  # the model directory (for a .gguf file: the directory holding it)
    gguf_file: str | None = None  # file name inside `directory`, for a GGUF checkpoint


def resolve_source(spec: str) -> PretrainedSource:
    """A local directory, a local .gguf file, or (anything else of the form owner/name) a hub id to download."""
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise UserError(
                f"model.init_from={spec}: a single file must be a .gguf checkpoint; for a Hugging Face checkpoint "
                "pass its directory"
            )
        path = os.path.abspath(path)
        return PretrainedSource(spec, os.path.dirname(path), os.path.basename(path))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"model.init_from={spec}: the directory has no config.json (not a Hugging Face model)")
        return PretrainedSource(spec, os.path.abspath(path))
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return PretrainedSource(spec, download_from_hub(spec))
    raise UserError(f"model.init_from={spec}: no such file or directory, and not a hub id (owner/name)")


def download_from_hub(repo_id: str) -> str:
    """Download config, tokenizer and weights of a hub model (safetensors if it has them, else .bin)."""
    from huggingface_hub import snapshot_download

    meta = ["*.json", "*.txt", "*.model", "*.tiktoken"]  # config, tokenizer files
    try:
        local = snapshot_download(repo_id, allow_patterns=[*meta, "*.safetensors"])
        if not glob.glob(os.path.join(local, "*.safetensors")):
            local = snapshot_download(repo_id, allow_patterns=[*meta, "*.bin"])
    except (OSError, ValueError) as e:  # offline, unknown repo, no access, malformed id: the hub's errors
        raise UserError(f"model.init_from={repo_id}: could not download it from the Hugging Face hub ({e})") from None
    return local


def check_gguf_rope(source: PretrainedSource) -> None:
    """Refuse a GGUF file with a `rope_freqs` tensor: Llama-3-style RoPE frequency scaling, which transformers'
    GGUF reader drops without a word, so the model would load as plain RoPE and compute something else."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise UserError(f"model.init_from={source.spec}: reading GGUF needs `pip install gguf` ({e})") from None
    try:
        names = {t.name for t in GGUFReader(os.path.join(source.directory, source.gguf_file)).tensors}
    except (OSError, ValueError) as e:
        raise UserError(f"model.init_from={source.spec}: cannot read the GGUF file ({e})") from None
    if "rope_freqs.weight" in names or "rope_freqs" in names:
        raise UserError(
            f"model.init_from={source.spec}: the GGUF file scales RoPE frequencies (a rope_freqs tensor, "
            "Llama-3-style RoPE scaling), which is not supported (plain RoPE only)"
        )


def read_hf_config(source: PretrainedSource) -> dict[str, Any]:
    """The checkpoint's Hugging Face config as a plain dict."""
    if source.gguf_file is not None:
        from transformers import AutoConfig

        check_gguf_rope(source)

        try:
            return AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file).to_dict()
        except ImportError as e:
            raise UserError(f"model.init_from={source.spec}: reading GGUF needs `pip install gguf` ({e})") from None
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"model.init_from={source.spec}: cannot read the GGUF file ({e})") from None
    with open(os.path.join(source.directory, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    # transformers < 5 writes rope_theta (+ rope_scaling); 5.x writes rope_parameters {rope_type, rope_theta}.
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UserError(f"model.init_from={where}: RoPE scaling {rope_type!r} is not supported (plain RoPE only)")
    return float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)


def backbone_config(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig backbone fields from a Llama / Qwen2 Hugging Face config."""
    model_type = hf.get("model_type")
    if model_type == ROUTED_MODEL_TYPE and SDT_CONFIG_KEY in hf:  # a routed export: Qwen2-style when it has biases
        model_type = "qwen2" if hf[SDT_CONFIG_KEY].get("qkv_bias") else "llama"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"model.init_from={where}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"model.init_from={where}: hidden_act={hf['hidden_act']!r}; only silu (SwiGLU) is supported")
    if hf.get("mlp_bias"):
        raise UserError(f"model.init_from={where}: mlp_bias=true is not supported")
    if model_type == "llama" and hf.get("attention_bias"):
        raise UserError(f"model.init_from={where}: attention_bias=true (bias on o_proj too) is not supported")
    if hf.get("use_sliding_window"):
        raise UserError(f"model.init_from={where}: sliding-window attention is not supported")
    n_heads = int(hf["num_attention_heads"])
    return {
        "vocab_size": int(hf["vocab_size"]),
        "d_model": int(hf["hidden_size"]),
        "n_layers": int(hf["num_hidden_layers"]),
        "n_heads": n_heads,
        "n_kv_heads": int(hf.get("num_key_value_heads") or n_heads),
        "head_dim": int(hf.get("head_dim") or hf["hidden_size"] // n_heads),
        "intermediate_size": int(hf["intermediate_size"]),
        "max_seq_len": int(hf.get("max_position_embeddings") or ModelConfig.max_seq_len),
        "rope_theta": _rope_theta(hf, where),
        "rms_norm_eps": float(hf.get("rms_norm_eps") or 1e-6),
        "qkv_bias": model_type == "qwen2",  # Qwen2 always has q/k/v biases, Llama (attention_bias=false) none
        # Omitted from a saved config when equal to the class default, which is False for Llama and Qwen2.
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def hf_config(cfg: ModelConfig, eos_token_id: int | None = None) -> dict[str, Any]:
    """A Hugging Face config.json for our backbone: Qwen2 when it has q/k/v biases, Llama otherwise."""
    model_type = "qwen2" if cfg.qkv_bias else "llama"
    d: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        d.update(attention_bias=False, mlp_bias=False)
    else:
        d.update(use_sliding_window=False, sliding_window=None)
    if eos_token_id is not None:
        d.update(eos_token_id=eos_token_id, bos_token_id=eos_token_id)
    # The exported weights are the model's own layers: a pruned model's layer selection is already applied.
    d[SDT_CONFIG_KEY] = {**cfg.to_dict(), "init_layers": None}
    return d


def backbone_block_names(model: nn.Module) -> list[str]:
    """Module names of the backbone blocks in stack order (an SDT pair: decision, then dynamic)."""
    return [name for name, module in model.named_modules() if isinstance(module, Block)]


def hf_name_map(model: nn.Module) -> dict[str, str]:
    """Our state-dict name -> the Hugging Face name, for every backbone tensor of `model` (a LanguageModel)."""
    blocks = backbone_block_names(model)
    if len(blocks) != model.config.n_layers:
        raise ValueError(f"the stack has {len(blocks)} blocks but the config says n_layers={model.config.n_layers}")
    mapping = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not model.config.tie_embeddings:
        mapping["lm_head.weight"] = "lm_head.weight"
    for i, prefix in enumerate(blocks):
        for local in model.get_submodule(prefix).state_dict():
            mapping[f"{prefix}.{local}"] = f"model.layers.{i}.{local}"
    return mapping


def routing_state_names(model: nn.Module) -> list[str]:
    """State-dict names that are not backbone: routers, priors, transition networks, gate scalars, thresholds."""
    backbone = set(hf_name_map(model)) | {"lm_head.weight"}
    return [name for name in model.state_dict() if name not in backbone]


def export_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor of `model` under export names: a dense model's as Hugging Face names (a plain Llama/Qwen2
    checkpoint), a routed model's as its own names under `model.` (what the shipped wrapper loads)."""
    state = model.state_dict()
    if model.is_routed:
        tied = "lm_head.weight" if model.config.tie_embeddings else None  # written once, as embed_tokens
        out = {PACKAGE_PREFIX + name: t for name, t in state.items() if name != tied}
    else:
        out = {hf: state[ours] for ours, hf in hf_name_map(model).items()}
    # safetensors refuses shared storage (tied embeddings are written once anyway): give each tensor its own.
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def hf_names_of_package_weights(weights: dict[str, Tensor], own: nn.Module) -> dict[str, Tensor]:
    """A routed export's weights under package names (`model.` + `own`'s names; `own`: the export's own model, on
    any device) -> the names `load_weights` reads: Hugging Face backbone names, the rest prefixed `sdt.`. A tensor
    `own` does not have keeps its name, so that `load_weights` reports it."""
    state = {k.removeprefix(PACKAGE_PREFIX): v for k, v in weights.items()}
    mapping = hf_name_map(own)
    out = {hf: state.pop(ours) for ours, hf in mapping.items() if ours in state}
    out.update({ROUTING_PREFIX + name: state.pop(name) for name in routing_state_names(own) if name in state})
    if own.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    out.update({PACKAGE_PREFIX + name: t for name, t in state.items()})
    return out


def _ignorable(name: str) -> bool:
    # Old Hugging Face checkpoints store RoPE's inverse frequencies; we recompute them from rope_theta.
    return name.endswith("rotary_emb.inv_freq")


def load_weights(model: nn.Module, weights: dict[str, Tensor], where: str) -> list[str]:
    """Copy a Hugging Face / export state dict into `model` by name; returns the routing tensors it loaded.

    Every backbone tensor must be present with the right shape, and every checkpoint tensor must have a place,
    or a UserError lists what is missing, unexpected or misshapen. Routing tensors (`sdt.` names, from an export)
    load when the model has exactly those; into another architecture they are skipped with a warning.
    """
    mapping = hf_name_map(model)
    state = model.state_dict()
    weights = {k: v for k, v in weights.items() if not _ignorable(k)}
    if model.config.tie_embeddings:
        weights.pop("lm_head.weight", None)  # a tied checkpoint may store the shared matrix twice
    routing = {k[len(ROUTING_PREFIX) :]: v for k, v in weights.items() if k.startswith(ROUTING_PREFIX)}
    expected = set(mapping.values())
    missing = sorted(hf for hf in expected if hf not in weights)
    unexpected = sorted(k for k in weights if k not in expected and not k.startswith(ROUTING_PREFIX))
    if missing or unexpected:
        raise UserError(
            f"model.init_from={where}: the checkpoint's weights do not match a {model.config.arch} model of "
            f"{model.config.n_layers} layers built from its config: missing {_names(missing)}, unexpected "
            f"{_names(unexpected)}"
        )
    wrong_shape = [
        f"{hf} {tuple(weights[hf].shape)} vs {tuple(state[ours].shape)}"
        for ours, hf in mapping.items()
        if weights[hf].shape != state[ours].shape
    ]
    if wrong_shape:
        raise UserError(f"model.init_from={where}: tensor shapes differ from the model's: {_names(wrong_shape)}")
    new_state = {ours: weights[hf].to(state[ours].dtype) for ours, hf in mapping.items()}

    loaded_routing: list[str] = []
    if routing:
        ours_routing = set(routing_state_names(model))
        # Exports from before the capacity dial have no quantile grids: those stay uncalibrated.
        required = {name for name in ours_routing if not name.endswith(".quantiles")}
        if required <= set(routing) <= ours_routing and all(routing[k].shape == state[k].shape for k in routing):
            new_state.update({k: v.to(state[k].dtype) for k, v in routing.items()})
            loaded_routing = sorted(routing)
        else:
            log.warning(
                "model.init_from=%s: its %d routing tensors belong to another architecture or layout than this %s "
                "model; only the backbone is loaded",
                where,
                len(routing),
                model.config.arch,
            )
    result = model.load_state_dict(new_state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return loaded_routing


def keep_layers(weights: dict[str, Tensor], layers: list[int]) -> dict[str, Tensor]:
    """The Hugging Face state dict of the model made of `layers` only, renumbered 0..len(layers) - 1 in order."""
    new_index = {old: new for new, old in enumerate(layers)}
    out = {}
    for name, tensor in weights.items():
        match = _LAYER_NAME.match(name)
        if match is None:
            out[name] = tensor
        elif int(match.group(1)) in new_index:
            out[f"model.layers.{new_index[int(match.group(1))]}.{match.group(2)}"] = tensor
    return out


_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}{more}]" if names else "[]"


def read_weights(source: PretrainedSource) -> dict[str, Tensor]:
    """All tensors of the checkpoint, under its own (Hugging Face) names, on the CPU."""
    if source.gguf_file is not None:
        return _read_gguf_weights(source)
    d = source.directory
    for index_name, reader in (
        ("model.safetensors.index.json", _read_safetensors),
        ("pytorch_model.bin.index.json", _read_bin),
    ):
        index = os.path.join(d, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return _merge(reader(os.path.join(d, s)) for s in shards)
    files = sorted(glob.glob(os.path.join(d, "*.safetensors")))
    if files:
        return _merge(_read_safetensors(f) for f in files)
    files = sorted(glob.glob(os.path.join(d, "pytorch_model*.bin")))
    if files:
        return _merge(_read_bin(f) for f in files)
    raise UserError(f"model.init_from={source.spec}: no *.safetensors or pytorch_model*.bin weights in {d}")


def _merge(parts) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for part in parts:
        out.update(part)
    return out


def _read_safetensors(path: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(path, device="cpu")


def _read_bin(path: str) -> dict[str, Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_gguf_weights(source: PretrainedSource) -> dict[str, Tensor]:
    # transformers knows llama.cpp's tensor names and undoes its q/k row permutation; quantised tensors come back
    # dequantised, in fp32.
    from transformers import AutoModelForCausalLM

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            source.directory, gguf_file=source.gguf_file, dtype=torch.float32
        )
    except ImportError as e:
        raise UserError(
            f"model.init_from={source.spec}: loading GGUF needs `pip install gguf accelerate` ({e})"
        ) from None
    return {k: v.detach() for k, v in hf_model.state_dict().items()}


class Pretrained:
    """A pretrained checkpoint opened for transfer: its config now, its weights when first asked for."""

    def __init__(self, spec: str) -> None:
        self.source = resolve_source(spec)
        self.hf_config = read_hf_config(self.source)
        self.backbone = backbone_config(self.hf_config, spec)
        # An sdt export carries its full model config; a plain Hugging Face checkpoint only the backbone.
        self.exported_config: dict[str, Any] | None = self.hf_config.get(SDT_CONFIG_KEY)

    @property
    def spec(self) -> str:
        return self.source.spec

    def model_dict(self, user: dict[str, Any]) -> dict[str, Any]:
        """The user's model options with the backbone fields replaced by the checkpoint's."""
        out = dict(user)
        changed = {k: (user.get(k), v) for k, v in self.backbone.items() if user.get(k) != v}
        out.update(self.backbone)
        out["init_from"] = self.spec
        layers = user.get("init_layers")
        if layers:  # static pruning: a shallower model of the kept layers
            n = self.backbone["n_layers"]
            if max(layers) >= n:
                raise UserError(f"model.init_layers={list(layers)} names a layer beyond the {n} of {self.spec}")
            out["n_layers"] = len(layers)
        if changed:
            log.info(
                "model.init_from=%s sets the backbone: %s",
                self.spec,
                ", ".join(f"{k}={new}" for k, (_, new) in changed.items()),
            )
        return out

    def own_model_dict(self) -> dict[str, Any]:
        """The model this checkpoint is: an export's own config (any arch), else a dense model of its backbone."""
        if self.exported_config is not None:  # its weights are its layers, whatever it was pruned from
            return {**self.exported_config, **self.backbone, "init_from": self.spec, "init_layers": None}
        return {"arch": "dense", **self.backbone, "init_from": self.spec}

    @cached_property
    def weights(self) -> dict[str, Tensor]:
        """Every tensor under Hugging Face names (routing tensors of an export: `sdt.` + our names)."""
        weights = read_weights(self.source)
        if self.hf_config.get(WEIGHT_NAMES_KEY) == PACKAGE_WEIGHT_NAMES:
            with torch.device("meta"):  # the export's own stack names its tensors; no memory needed for that
                own = build_model(ModelConfig.from_dict(self.own_model_dict()))
            weights = hf_names_of_package_weights(weights, own)
        return weights

    def load_into(self, model: nn.Module) -> list[str]:
        """Copy the weights into `model` (see `load_weights`); returns the routing tensors that were loaded."""
        weights = self.weights
        if model.config.init_layers is not None:
            weights = keep_layers(weights, model.config.init_layers)
        loaded = load_weights(model, weights, self.spec)
        log.info(
            "loaded %d backbone layers from %s into %s%s",
            model.config.n_layers,
            self.spec,
            model.config.arch,
            f" (and {len(loaded)} routing tensors)" if loaded else "",
        )
        return loaded

    def tokenizer_source(self) -> tuple[str, str | None]:
        """(directory, gguf_file) to hand to `AutoTokenizer.from_pretrained`: the tokenizer ships with the weights."""
        return self.source.directory, self.source.gguf_file
