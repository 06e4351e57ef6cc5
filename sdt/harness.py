"""An lm-evaluation-harness model for `sdt` checkpoints and pretrained models: `sdt-lm-eval --model sdt ...`.

    sdt-lm-eval --model sdt --model_args ckpt_path=<run>/checkpoints/last.ckpt --tasks shakespeare_next_line \\
        --include_path sdt/harness_tasks

Model arguments: `ckpt_path=<.ckpt>` or `init_from=<HF dir | .gguf | hub id>` (as for evaluate.py), `routing=`
(routed models: a causal mode, `threshold`, `student` or `budget`; default the model's `inference_routing`),
`capacity=` (routed models: the run-time capacity in (0, 1], thresholds read from the calibrated quantile grids as
`set_inference_capacity` does; default the trained capacity), `batch_size`, `device` (auto | cpu | cuda |
cuda:<index>; a CUDA device that does not exist here falls back to CUDA or the CPU, as for lm-eval's `hf` model) and
`max_length` (the longest window scored; default the sequence length the model was trained on, else
`model.max_seq_len`).

Routed models always run a causal routing mode here: the Top-K oracle chooses tokens by looking at the whole
sequence, so a continuation's score would depend on tokens after it. Every row of a batch is scored as if alone:
causal routing decides per token, and padding neither executes nor is attended to.

`sdt-lm-eval <lm_eval arguments>` (the console script; or `python -m sdt.harness`) runs lm-eval's own command line
with the model registered, which works with every lm-eval release; importing this module registers it too. lm-eval
releases that load model plugins also find it by the name `sdt` through the `lm_eval.models` entry point
(pyproject.toml), so plain `lm_eval --model sdt` works there (not in 0.4.13, which reads only its own registry).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from sdt.common.errors import UserError
from sdt.evaluation.loading import check_device, load_model_and_tokenizer, pick_device
from sdt.models.transformer import left_pad
from sdt.routing.selection import CAUSAL_MODES

try:
    from lm_eval.api import registry
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - the message is what a user without the extra sees
    raise UserError("the lm-eval model needs lm-evaluation-harness: pip install -e '.[eval]'") from e

MODEL_NAME = "sdt"
log = logging.getLogger(__name__)


def harness_device(device: str | None) -> torch.device:
    """The device to run on. lm-eval's command line passes `cuda:0` when `--device` is not given; as lm-eval's own
    `hf` model does, a CUDA device that does not exist here falls back to what does (CUDA, else the CPU), with a
    warning, so that the same command runs on a machine without a GPU."""
    name = device or "auto"
    check_device(name)
    if name.startswith("cuda"):
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            fallback = "cuda" if torch.cuda.is_available() else "cpu"
            log.warning("device %s does not exist here; running on %s", name, fallback)
            name = fallback
    return pick_device(name)


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Request indices in batches of similar length, longest first (less padding, and an out-of-memory error
    shows up on the first batch rather than the last)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class SDTLM(TemplateLM):
    """lm-eval's three request types on an `sdt` LanguageModel, in batches."""

    def __init__(
        self,
        ckpt_path: str | None = None,
        init_from: str | None = None,
        routing: str | None = None,
        capacity: float | str | None = None,
        batch_size: int | str = 8,
        device: str | None = "auto",
        max_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(k for k in kwargs if k not in ("max_batch_size",))  # lm-eval passes max_batch_size
        if unknown:
            raise UserError(
                f"unknown sdt model argument(s) {unknown}; valid: ckpt_path, init_from, routing, capacity, batch_size, "
                "device, max_length"
            )
        if not ckpt_path and not init_from:
            raise UserError("the sdt model needs ckpt_path=<.ckpt> or init_from=<pretrained checkpoint>")
        self._device = harness_device(device)
        cfg = OmegaConf.create({"ckpt_path": ckpt_path, "model": {"init_from": init_from}})
        self.model, self.tokenizer, self.valid_vocab, ckpt = load_model_and_tokenizer(cfg, self._device)
        self.routing = self._routing(routing)
        if capacity is not None:
            self._set_capacity(capacity)
        self.batch_size = self._batch_size(batch_size)
        trained_len = None
        if ckpt is not None:
            trained_len = ((ckpt["sdt"].get("config") or {}).get("data") or {}).get("seq_len")
        self.max_length = int(max_length or trained_len or self.model.config.max_seq_len)
        if not 2 <= self.max_length <= self.model.config.max_seq_len:
            raise UserError(
                f"max_length={self.max_length} must be in [2, model.max_seq_len={self.model.config.max_seq_len}]"
            )

    def _routing(self, routing: str | None) -> str | None:
        if not self.model.is_routed:
            return None
        routing = routing or self.model.config.inference_routing
        if routing not in CAUSAL_MODES:
            raise UserError(
                f"routing={routing!r}: lm-eval scores routed models in a causal routing mode, one of "
                f"{', '.join(CAUSAL_MODES)} (topk looks at the tokens after the one it routes)"
            )
        if self.model.config.arch == "stt" and routing == "threshold":
            raise UserError(
                "routing=threshold needs STT's teacher pass over the whole sequence; use routing=student or budget"
            )
        return routing

    def _set_capacity(self, capacity: float | str) -> None:
        """The run-time capacity dial (docs/inference.md): thresholds from the calibrated quantile grids."""
        if not self.model.is_routed:
            raise UserError("capacity= applies to routed models (sdt, stt, mod); this one is dense")
        try:
            value = float(capacity)
        except ValueError:
            raise UserError(f"capacity must be a number in (0, 1], got {capacity!r}") from None
        self.model.set_inference_capacity(value)

    @staticmethod
    def _batch_size(batch_size: int | str) -> int:
        try:
            value = int(batch_size)
        except ValueError:
            value = 0
        if value < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r} (auto is not supported)")
        return value

    # --- what TemplateLM needs
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return f"sdt-{self.tokenizer.kind}-{self.tokenizer.vocab_size}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def _continuation_logprobs(self, rows: list[list[int]], keep: int) -> torch.Tensor:
        """Left-padded rows -> fp32 log-probabilities (B, keep, V) of the last `keep` positions only (the
        continuations end every row, so the full-vocabulary softmax runs over them alone)."""
        ids, mask = left_pad(rows)
        padded = not bool(mask.all())
        out = self.model(
            ids.to(self._device),
            pad_mask=mask.to(self._device) if padded else None,
            routing=self.routing,
            logits_to_keep=keep,
            diagnostics=False,
        )
        return F.log_softmax(out.logits.float(), dim=-1)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """(request, context ids, continuation ids) -> (sum of the continuation's log-probabilities, is greedy).

        Context and continuation are cut from the left to `max_length` + 1 tokens (the last one is only predicted).
        """
        inputs, conts = [], []
        for _, ctx, cont in requests:
            if not cont:
                raise UserError("lm-eval sent an empty continuation to score")
            whole = (ctx + cont)[-(self.max_length + 1) :]
            inputs.append(whole[:-1])
            conts.append(cont[-self.max_length :])
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        batches = sorted_batches([len(x) for x in inputs], self.batch_size)
        for batch in tqdm(batches, desc="sdt loglikelihood", disable=disable_tqdm or self.rank != 0):
            keep = max(len(conts[i]) for i in batch)
            logp = self._continuation_logprobs([inputs[i] for i in batch], keep)
            for row, i in enumerate(batch):
                cont = conts[i]
                cont_logp = logp[row, keep - len(cont) :]  # (C, V): the positions that predict the continuation
                target = torch.tensor(cont, device=cont_logp.device)
                score = float(cont_logp.gather(1, target[:, None]).sum())
                greedy = bool((cont_logp.argmax(dim=-1) == target).all())
                results[i] = (score, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole string, after end-of-text, in disjoint windows of `max_length` tokens
        (each token scored once, with all earlier tokens of its window as context)."""
        windows, owner = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            for context, pred in map(
                make_disjoint_window,
                get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1),
            ):
                windows.append(((string, ""), context, pred))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (score, _) in zip(owner, scores, strict=True):
            totals[n] += score
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with `do_sample` and `temperature`) continuations, cut at the first stop string.

        Requests with the same generation arguments share batches; prompts are left-padded and cut from the left
        so that prompt + `max_gen_toks` fit `max_length`.
        """
        results: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        progress = tqdm(total=len(requests), desc="sdt generate_until", disable=disable_tqdm or self.rank != 0)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until, max_new, sample = self._generation_options(kwargs)
            prompts = {i: self.tok_encode(requests[i].args[0]) or [self.eot_token_id] for i in indices}
            keep = self.max_length - max_new
            if keep < 1:
                raise UserError(f"max_gen_toks={max_new} leaves no room for the prompt in max_length={self.max_length}")
            prompts = {i: p[-keep:] for i, p in prompts.items()}
            order = sorted_batches([len(prompts[i]) for i in indices], self.batch_size)
            for batch in order:
                batch_ids = [indices[j] for j in batch]
                texts = self._generate([prompts[i] for i in batch_ids], max_new, sample)
                for i, text in zip(batch_ids, texts, strict=True):
                    results[i] = cut_at_stops(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                progress.update(len(batch_ids))
        progress.close()
        return results

    def _generation_options(self, kwargs: dict[str, Any]) -> tuple[list[str], int, float]:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        eos_text = self.tok_decode([self.eot_token_id])
        if eos_text not in until:
            until.append(eos_text)
        max_new = int(kwargs.pop("max_gen_toks", 256))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if not kwargs.pop("do_sample", False):
            temperature = 0.0
        return until, max_new, temperature

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], max_new: int, temperature: float) -> list[str]:
        ids, mask = left_pad(prompts)
        out = self.model.generate(
            ids.to(self._device),
            max_new,
            temperature=temperature,
            pad_mask=mask.to(self._device) if not bool(mask.all()) else None,
            eos_id=self.eot_token_id,
            routing=self.routing,
            valid_vocab=self.valid_vocab,
        )
        texts = []
        for row in out[:, ids.shape[1] :].tolist():
            if self.eot_token_id in row:
                row = row[: row.index(self.eot_token_id)]
            texts.append(self.tok_decode(row))
        return texts

    def get_model_info(self) -> dict[str, Any]:
        return {"sdt_arch": self.model.config.arch, "sdt_routing": self.routing, "max_length": self.max_length}


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def register() -> type[SDTLM]:
    """Make `--model sdt` resolve to SDTLM (a no-op where the entry point already registered it)."""
    models = getattr(registry, "model_registry", None)
    if models is None:  # releases before the Registry class keep a plain dict
        registry.MODEL_REGISTRY.setdefault(MODEL_NAME, SDTLM)
    elif MODEL_NAME not in models:
        models.register(MODEL_NAME, target=SDTLM)
    return SDTLM


def main(argv: list[str] | None = None, cli: Callable[[], None] | None = None) -> None:
    """lm-eval's command line, with the `sdt` model registered: `python -m sdt.harness --model sdt ...`."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    (cli or cli_evaluate)()


if __name__ == "__main__":
    # Run as `python -m sdt.harness`: register the class of the importable module, not of this __main__ copy.
    import importlib

    importlib.import_module("sdt.harness").main()
else:
    register()
