"""Offline tasks for path search: multiple choice scored by log-likelihood, short answer scored by exact match.

A task comes from one of (docs/cola.md):
- a shipped name (`basic_mc`, `arithmetic_qa`: files in sdt/search/tasks/);
- a local JSONL file, one item a line: `{"question", "choices", "answer": index}` (multiple choice) or
  `{"question", "answer": text}` (short answer); the prompt is "Question: {question}\\nAnswer:";
- an lm-eval-harness task YAML whose data is a local JSON/JSONL file (the supported subset is in `YAML_KEYS`).

`PathScorer` answers one item under one layer path: the choice with the highest summed log-likelihood of its tokens
after the prompt (lm-eval's `acc`), or the greedy continuation up to a stop string, compared after stripping
whitespace and a final period.
"""

from __future__ import annotations

import ast
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from torch import Tensor

from sdt.data.tokenizer import Tokenizer
from sdt.errors import UserError
from sdt.models import LanguageModel

log = logging.getLogger(__name__)

TASK_DIR = os.path.join(os.path.dirname(__file__), "tasks")
KINDS = ("multiple_choice", "short_answer")
# lm-eval task YAML keys read here; metadata keys are ignored; any other key is an error rather than silently
# changing what is evaluated.
YAML_KEYS = {
    "task", "dataset_path", "dataset_name", "dataset_kwargs", "test_split", "validation_split", "output_type",
    "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter", "description", "generation_kwargs",
    "num_fewshot",
}  # fmt: skip
YAML_IGNORED = {"tag", "group", "metric_list", "metadata", "should_decontaminate", "doc_to_decontamination_query"}
OUTPUT_TYPES = {"multiple_choice": "multiple_choice", "generate_until": "short_answer"}


@dataclass
class TaskItem:
    prompt: str
    answer: int | str  # the correct choice's index (multiple choice) or the reference text (short answer)
    choices: list[str] | None = None


@dataclass
class Task:
    name: str
    kind: str
    items: list[TaskItem]
    target_delimiter: str = " "  # between the prompt and a choice
    until: list[str] = field(default_factory=lambda: ["\n"])  # short answer: generation stops at these
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.items:
            raise UserError(f"task {self.name!r} has no items")


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        raise UserError(f"task data file {path!r} does not exist")
    with open(path) as f:
        if path.endswith(".json"):
            data = json.load(f)
            return data if isinstance(data, list) else data.get("data", [])
        return [json.loads(line) for line in f if line.strip()]


def task_from_jsonl(path: str, name: str | None = None) -> Task:
    """Items `{"question", "choices", "answer": index}` or `{"question", "answer": text}`."""
    rows = _read_jsonl(path)
    name = name or os.path.splitext(os.path.basename(path))[0]
    kind = "multiple_choice" if rows and "choices" in rows[0] else "short_answer"
    items = []
    for n, row in enumerate(rows, 1):
        if "question" not in row or "answer" not in row:
            raise UserError(f"{path}, line {n}: an item needs 'question' and 'answer' keys, got {sorted(row)}")
        prompt = f"Question: {row['question']}\nAnswer:"
        if kind == "multiple_choice":
            choices, answer = row.get("choices"), row["answer"]
            if not isinstance(choices, list) or not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise UserError(f"{path}, line {n}: 'choices' must be a list and 'answer' an index into it")
            items.append(TaskItem(prompt, answer, [str(c) for c in choices]))
        else:
            items.append(TaskItem(prompt, str(row["answer"])))
    return Task(name, kind, items)


def _render(template: Any, doc: dict[str, Any]) -> Any:
    """lm-eval's doc_to_*: a field name, a Jinja template over the document's fields, or a literal (list/int)."""
    if not isinstance(template, str):
        return template
    if template in doc:
        return doc[template]
    import jinja2

    return jinja2.Template(template).render(**doc)


def _choice_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise UserError(f"{where}: doc_to_choice must give a list, got {value!r}") from e
    if not isinstance(value, list | tuple):
        raise UserError(f"{where}: doc_to_choice must give a list, got {value!r}")
    return [str(c) for c in value]


def _resolve_data_path(path: str, yaml_dir: str) -> str:
    for candidate in (path, os.path.join(yaml_dir, path)):
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"task data file {path!r} not found (looked in the working directory and next to the YAML)")


def task_from_yaml(path: str) -> Task:
    """An lm-eval-harness task YAML over local data (docs/cola.md lists the supported keys)."""
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    unknown = sorted(set(spec) - YAML_KEYS - YAML_IGNORED)
    if unknown:
        raise UserError(f"{path}: unsupported lm-eval task keys {unknown}; supported: {sorted(YAML_KEYS)}")
    if int(spec.get("num_fewshot") or 0) > 0:
        raise UserError(f"{path}: num_fewshot > 0 is not supported")
    output_type = spec.get("output_type", "multiple_choice")
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"{path}: output_type must be one of {sorted(OUTPUT_TYPES)}, got {output_type!r}")
    split = spec.get("test_split") or spec.get("validation_split") or "test"
    data_files = (spec.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(data_files, dict):
        if split not in data_files:
            raise UserError(f"{path}: dataset_kwargs.data_files has no {split!r} split")
        data_files = data_files[split]
    if isinstance(data_files, list):
        data_files = data_files[0]
    source = data_files or spec.get("dataset_path")
    if not source or not str(source).endswith((".json", ".jsonl")):
        raise UserError(
            f"{path}: the data must be a local JSON/JSONL file: dataset_path: json with dataset_kwargs.data_files, "
            f"or dataset_path: <file>.jsonl (hub datasets are not read offline)"
        )
    docs = _read_jsonl(_resolve_data_path(str(source), os.path.dirname(os.path.abspath(path))))
    kind = OUTPUT_TYPES[output_type]
    description = spec.get("description") or ""
    items = []
    for n, doc in enumerate(docs):
        where = f"{path}, document {n}"
        prompt = description + str(_render(spec.get("doc_to_text", "question"), doc))
        target = _render(spec.get("doc_to_target", "answer"), doc)
        if kind == "multiple_choice":
            choices = _choice_list(_render(spec.get("doc_to_choice", "choices"), doc), where)
            if isinstance(target, str) and target.strip().lstrip("-").isdigit():
                target = int(target)
            elif isinstance(target, str):
                if target not in choices:
                    raise UserError(f"{where}: doc_to_target {target!r} is neither an index nor one of the choices")
                target = choices.index(target)
            if not 0 <= int(target) < len(choices):
                raise UserError(f"{where}: target index {target} out of range for {len(choices)} choices")
            items.append(TaskItem(prompt, int(target), choices))
        else:
            items.append(TaskItem(prompt, str(target)))
    gen = spec.get("generation_kwargs") or {}
    return Task(
        name=str(spec.get("task") or os.path.splitext(os.path.basename(path))[0]),
        kind=kind,
        items=items,
        target_delimiter=str(spec.get("target_delimiter", " ")),
        until=list(gen.get("until") or ["\n"]),
        max_new_tokens=int(gen.get("max_gen_toks", 16)),
    )


def shipped_tasks() -> list[str]:
    return sorted(os.path.splitext(f)[0] for f in os.listdir(TASK_DIR) if f.endswith(".jsonl"))


def load_task(spec: str) -> Task:
    """A shipped task name, a .jsonl/.json file or an lm-eval .yaml file."""
    spec = str(spec)
    if spec.endswith((".yaml", ".yml")):
        if not os.path.isfile(spec):
            raise UserError(f"task YAML {spec!r} does not exist")
        return task_from_yaml(spec)
    if spec.endswith((".jsonl", ".json")):
        return task_from_jsonl(spec)
    if spec in shipped_tasks():
        return task_from_jsonl(os.path.join(TASK_DIR, f"{spec}.jsonl"))
    raise UserError(f"unknown task {spec!r}: name a .jsonl or lm-eval .yaml file, or one of {shipped_tasks()}")


def normalise_answer(text: str) -> str:
    return text.strip().rstrip(".").strip()


class PathScorer:
    """Is the model's answer to an item correct when it runs a given layer path?"""

    def __init__(
        self,
        model: LanguageModel,
        tokenizer: Tokenizer,
        task: Task,
        device: torch.device,
        valid_vocab: int | None = None,
    ) -> None:
        self.model, self.tokenizer, self.task, self.device = model, tokenizer, task, device
        self.valid_vocab = valid_vocab
        # Routed models run their causal mode: it does not depend on the batch's other rows or on padding.
        self.routing = model.config.inference_routing if model.is_routed else None
        self._prepared: dict[int, Any] = {}

    def _choice_batch(self, item: TaskItem) -> tuple[Tensor, Tensor, list[list[int]]]:
        """Left-padded (prompt + choice) ids (C, W), their pad mask and each choice's own token ids."""
        ctx = self.tokenizer.encode(item.prompt)
        rows, conts = [], []
        for choice in item.choices:
            full = self.tokenizer.encode(item.prompt + self.task.target_delimiter + choice)
            # Tokenise prompt and choice together (merges across the boundary as the model saw in training).
            cont = (
                full[len(ctx) :]
                if full[: len(ctx)] == ctx
                else self.tokenizer.encode(self.task.target_delimiter + choice)
            )
            rows.append(ctx + cont)
            conts.append(cont)
        width = max(len(r) for r in rows)
        if width > self.model.config.max_seq_len:
            raise UserError(
                f"an item of {width} tokens is longer than model.max_seq_len={self.model.config.max_seq_len}"
            )
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = True
        return ids.to(self.device), mask.to(self.device), conts

    def _choice_inputs(self, item: TaskItem) -> tuple[Tensor, Tensor, list[list[int]]]:
        key = id(item)
        if key not in self._prepared:
            self._prepared[key] = self._choice_batch(item)
        return self._prepared[key]

    @torch.no_grad()
    def choice_loglikelihoods(self, item: TaskItem, path: Sequence[int] | None) -> list[float]:
        ids, mask, conts = self._choice_inputs(item)
        keep = max(len(c) for c in conts) + 1
        out = self.model(
            ids, pad_mask=mask, layer_path=path, logits_to_keep=keep, routing=self.routing, diagnostics=False
        )
        return self._choice_scores(out.logits, conts)

    @staticmethod
    def _choice_scores(logits: Tensor, conts: list[list[int]]) -> list[float]:
        """Summed log-likelihood of each choice's tokens, from the logits (C, keep, V) of the rows' last positions."""
        keep = logits.size(1)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (C, keep, V); position j predicts token j + 1
        scores = []
        for i, cont in enumerate(conts):
            # The choice's tokens are the row's last len(cont); the logits before each of them predict it.
            pos = torch.arange(keep - 1 - len(cont), keep - 1, device=logp.device)
            scores.append(float(logp[i, pos, torch.tensor(cont, device=logp.device)].sum()))
        return scores

    @torch.no_grad()
    def generate_answer(self, item: TaskItem, path: Sequence[int] | None) -> str:
        ids = self.tokenizer.encode(item.prompt)
        max_new = min(self.task.max_new_tokens, self.model.config.max_seq_len - len(ids))
        out = self.model.generate(
            torch.tensor([ids], device=self.device),
            max_new,
            temperature=0.0,
            eos_id=self.tokenizer.eos_id,
            valid_vocab=self.valid_vocab,
            routing=self.routing,
            layer_path=path,
        )[0, len(ids) :].tolist()
        if self.tokenizer.eos_id in out:
            out = out[: out.index(self.tokenizer.eos_id)]
        text = self.tokenizer.decode(out)
        for stop in self.task.until:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text

    def answer(self, item: TaskItem, path: Sequence[int] | None) -> int | str:
        if self.task.kind == "multiple_choice":
            scores = self.choice_loglikelihoods(item, path)
            return max(range(len(scores)), key=scores.__getitem__)
        return self.generate_answer(item, path)

    def correct(self, item: TaskItem, path: Sequence[int] | None) -> bool:
        answer = self.answer(item, path)
        if self.task.kind == "multiple_choice":
            return answer == item.answer
        return normalise_answer(answer) == normalise_answer(item.answer)
