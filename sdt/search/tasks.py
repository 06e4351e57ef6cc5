"""Offline tasks for path search: multiple choice scored by log-likelihood, short answer scored by exact match.

A task comes from one of (docs/cola.md):
- a shipped name (`basic_mc`, `arithmetic_qa`: files in sdt/search/tasks/);
- a local JSONL file, one item a line: `{"question", "choices", "answer": index}` (multiple choice) or
  `{"question", "answer": text}` (short answer); the prompt is "Question: {question}\\nAnswer:";
- an lm-eval-harness task: a YAML file or a task name, built by lm-eval's own task manager (prompts, choices,
  gold answer; `pip install -e '.[eval]'`), zero-shot.

`PathScorer` answers one item under one layer path: the choice with the highest summed log-likelihood of its tokens
after the prompt (lm-eval's `acc`), or the greedy continuation up to a stop string, compared after stripping
whitespace and a final period.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sdt.common.errors import UserError
from sdt.data.tokenizer import Tokenizer
from sdt.models import LanguageModel
from sdt.models.transformer import left_pad

log = logging.getLogger(__name__)

TASK_DIR = os.path.join(os.path.dirname(__file__), "tasks")
HARNESS_TASK_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "harness_tasks")
KINDS = ("multiple_choice", "short_answer")
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


def _lm_eval_task(spec: str) -> Any:
    """The lm-eval Task object for a task name or a task YAML path, through lm-eval's own task manager.

    Names resolve among lm-eval's tasks and the tasks shipped here (sdt/search/tasks, sdt/harness_tasks). A YAML's
    `dataset_kwargs.data_files` that name files next to it are resolved against its directory (datasets would
    resolve them against the working directory).
    """
    try:
        from lm_eval.tasks import TaskManager, get_task_dict
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:
        raise UserError(f"task={spec}: lm-eval tasks need lm-evaluation-harness: pip install -e '.[eval]'") from None
    # lm-eval's own few thousand task configs take a while to index: only when the name is not one of ours.
    manager = TaskManager(include_path=[TASK_DIR, HARNESS_TASK_DIR], include_defaults=False)
    source: Any = spec
    if spec.endswith((".yaml", ".yml")):
        source = load_yaml(spec, resolve_func=True)
        _resolve_data_files(source, os.path.dirname(os.path.abspath(spec)))
    elif not manager.match_tasks([spec]):
        manager = TaskManager(include_path=[TASK_DIR, HARNESS_TASK_DIR])
        if not manager.match_tasks([spec]):
            raise UserError(
                f"unknown task {spec!r}: name a .jsonl or lm-eval .yaml file, a shipped task "
                f"({', '.join(shipped_tasks())}) or an lm-eval task"
            )
    try:
        tasks = get_task_dict([source], manager)
    except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many kinds; name the task and keep the reason
        raise UserError(f"task={spec}: lm-eval could not load it: {type(e).__name__}: {e}") from None
    leaves = _leaf_tasks(tasks)
    if len(leaves) != 1:
        raise UserError(f"task={spec} is a group of {len(leaves)} lm-eval tasks; name one of them")
    return leaves[0]


def _leaf_tasks(tasks: dict) -> list[Any]:
    out = []
    for value in tasks.values():
        out.extend(_leaf_tasks(value) if isinstance(value, dict) else [value])
    return out


def _resolve_data_files(cfg: dict[str, Any], yaml_dir: str) -> None:
    kwargs = cfg.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")

    def resolve(f: str) -> str:
        return f if os.path.isabs(f) or os.path.exists(f) else os.path.join(yaml_dir, f)

    if isinstance(files, str):
        kwargs["data_files"] = resolve(files)
    elif isinstance(files, list):
        kwargs["data_files"] = [resolve(f) for f in files]
    elif isinstance(files, dict):
        kwargs["data_files"] = {
            k: resolve(v) if isinstance(v, str) else [resolve(f) for f in v] for k, v in files.items()
        }


def task_from_lm_eval(spec: str) -> Task:
    """A task built by lm-eval from its config: the zero-shot requests lm-eval would send (context and each
    choice's continuation, or context and stop strings) and the gold answer from `doc_to_target`."""
    task = _lm_eval_task(spec)
    output_type = task.OUTPUT_TYPE
    if output_type not in OUTPUT_TYPES:
        raise UserError(
            f"task={spec}: output_type {output_type!r} is not searchable; use one of {sorted(OUTPUT_TYPES)}"
        )
    task.set_config("num_fewshot", 0)  # the search scores each item on its own
    task.build_all_requests(rank=0, world_size=1)
    requests: dict[int, list[Any]] = {}
    for instance in task.instances:
        requests.setdefault(instance.doc_id, []).append(instance)
    items, until, max_new = [], ["\n"], 16
    for doc_id in sorted(requests):
        group = sorted(requests[doc_id], key=lambda r: r.idx)
        doc = group[0].doc
        context = group[0].args[0]
        target = task.doc_to_target(doc)
        if output_type == "multiple_choice":
            choices = [r.args[1] for r in group]  # continuations as lm-eval scores them (delimiter included)
            gold = target if isinstance(target, int) else task.doc_to_choice(doc).index(target)
            items.append(TaskItem(context, int(gold), choices))
        else:
            gen = dict(group[0].args[1])
            until = list(gen.get("until") or ["\n"])
            max_new = int(gen.get("max_gen_toks", 16))
            items.append(TaskItem(context, str(target[0] if isinstance(target, list) else target)))
    return Task(
        name=str(task.config.task),
        kind=OUTPUT_TYPES[output_type],
        items=items,
        target_delimiter="",
        until=until,
        max_new_tokens=max_new,
    )


def shipped_tasks() -> list[str]:
    return sorted(os.path.splitext(f)[0] for f in os.listdir(TASK_DIR) if f.endswith(".jsonl"))


def load_task(spec: str) -> Task:
    """A shipped task name, a .jsonl/.json file, or an lm-eval task (a .yaml file or a task name)."""
    spec = str(spec)
    if spec.endswith((".yaml", ".yml")):
        if not os.path.isfile(spec):
            raise UserError(f"task YAML {spec!r} does not exist")
        return task_from_lm_eval(spec)
    if spec.endswith((".jsonl", ".json")):
        return task_from_jsonl(spec)
    if spec in shipped_tasks():
        return task_from_jsonl(os.path.join(TASK_DIR, f"{spec}.jsonl"))
    return task_from_lm_eval(spec)


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
        ids, mask = left_pad(rows)
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
