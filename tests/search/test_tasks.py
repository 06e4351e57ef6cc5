import json
import re

import pytest
import torch

from sdt.common.errors import UserError
from sdt.data.tokenizer import train_bpe
from sdt.models import build_model
from sdt.search.tasks import PathScorer, Task, TaskItem, load_task, shipped_tasks, task_from_jsonl
from tests.conftest import tiny_model_config

ARITHMETIC = re.compile(r"^What is (\d+) ([-+*]) (\d+)\?$")


def _value(question: str) -> int | None:
    m = ARITHMETIC.match(question)
    if m is None:
        return None
    a, op, b = int(m[1]), m[2], int(m[3])
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def test_shipped_task_set_is_large_enough_and_its_answers_are_right():
    assert {"basic_mc", "arithmetic_qa"} <= set(shipped_tasks())
    mc = load_task("basic_mc")
    assert mc.kind == "multiple_choice" and len(mc.items) >= 100
    n_arith = 0
    for item in mc.items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4 and 0 <= item.answer < 4
        question = item.prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
        value = _value(question)
        if value is not None:
            n_arith += 1
            assert item.choices[item.answer] == str(value), question
    assert 50 <= n_arith < len(mc.items)  # arithmetic and general knowledge
    # The correct answer is not always in the same slot.
    assert len({item.answer for item in mc.items}) == 4
    qa = load_task("arithmetic_qa")
    assert qa.kind == "short_answer"
    assert all(item.answer == str(_value(item.prompt[10:-8])) for item in qa.items)


@pytest.mark.slow  # lm-eval's task manager indexes its task set: the default suite stays within its time budget
def test_bad_task_specs(tmp_path):
    with pytest.raises(UserError, match="unknown task 'nope'"):
        load_task("nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2}) + "\n")
    with pytest.raises(UserError, match="line 1: 'choices' must be a list and 'answer' an index"):
        task_from_jsonl(str(bad))
    bad.write_text(json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(UserError, match="needs 'question' and 'answer'"):
        task_from_jsonl(str(bad))


def test_lm_eval_yaml_over_local_data_is_built_by_lm_eval(tmp_path):
    pytest.importorskip("lm_eval")
    data = tmp_path / "data.jsonl"
    rows = [
        {"q": "2 + 2", "options": ["3", "4"], "label": 1},
        {"q": "1 + 0", "options": ["1", "5"], "label": 0},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tmp_path / "mine.yaml"
    spec.write_text(
        "task: sums\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: data.jsonl\n"  # next to the YAML, not in the working directory
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: 'Sum: {{q}} ='\n"
        "doc_to_choice: options\n"
        "doc_to_target: label\n"
        "metric_list: [{metric: acc}]\n"
    )
    task = load_task(str(spec))
    assert task.name == "sums" and task.kind == "multiple_choice"
    # lm-eval's own requests: the context, and each choice as the continuation it scores (delimiter included).
    assert [(i.prompt, i.choices, i.answer) for i in task.items] == [
        ("Sum: 2 + 2 =", [" 3", " 4"], 1),
        ("Sum: 1 + 0 =", [" 1", " 5"], 0),
    ]
    # generate_until with a template target and stop strings.
    spec.write_text(
        "task: sums_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data.jsonl\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: '{{q}} ='\n"
        "doc_to_target: '{{options[label]}}'\ngeneration_kwargs: {until: ['.'], max_gen_toks: 5}\n"
    )
    task = load_task(str(spec))
    assert task.kind == "short_answer" and task.until == ["."] and task.max_new_tokens == 5
    assert [(i.prompt, i.answer) for i in task.items] == [("2 + 2 =", "4"), ("1 + 0 =", "1")]
    with pytest.raises(UserError, match="task YAML 'nope.yaml' does not exist"):
        load_task("nope.yaml")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = train_bpe(["Question: What is one plus two?\nAnswer: three four five six seven"] * 20, 300)
    torch.manual_seed(0)
    cfg = tiny_model_config(vocab_size=300, n_layers=3)  # the tokenizer's vocabulary; paths over 3 layers
    return build_model(cfg).eval(), tokenizer


def test_choice_loglikelihoods_match_an_unpadded_forward(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    item = TaskItem("Question: What is one plus two?\nAnswer:", 1, ["three", "four five six", "seven"])
    scorer = PathScorer(model, tokenizer, Task("t", "multiple_choice", [item]), torch.device("cpu"))
    path = [0, 2, 2]
    got = scorer.choice_loglikelihoods(item, path)
    ctx = tokenizer.encode(item.prompt)
    for choice, score in zip(item.choices, got, strict=True):
        ids = tokenizer.encode(item.prompt + " " + choice)
        assert ids[: len(ctx)] == ctx
        logp = torch.log_softmax(model(torch.tensor([ids]), layer_path=path).logits[0], dim=-1)
        expected = sum(float(logp[t - 1, ids[t]]) for t in range(len(ctx), len(ids)))
        assert score == pytest.approx(expected, abs=1e-4)
    assert scorer.correct(item, path) == (max(range(3), key=got.__getitem__) == 1)
    assert got != scorer.choice_loglikelihoods(item, None)  # the path matters


def test_short_answer_is_the_greedy_continuation_up_to_the_stop_string(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    item = TaskItem("Question: What is one plus two?\nAnswer:", "")
    task = Task("t", "short_answer", [item], until=["\n"], max_new_tokens=6)
    scorer = PathScorer(model, tokenizer, task, torch.device("cpu"))
    text = scorer.generate_answer(item, [1, 0])
    ids = tokenizer.encode(item.prompt)
    out = model.generate(torch.tensor([ids]), 6, temperature=0.0, layer_path=[1, 0], eos_id=tokenizer.eos_id)
    assert tokenizer.decode(out[0, len(ids) :].tolist()).startswith(text) and "\n" not in text
    item.answer = text.strip() + "."  # exact match ignores surrounding spaces and a final period
    assert scorer.correct(item, [1, 0])
    item.answer = text.strip() + "x"
    assert not scorer.correct(item, [1, 0])


def test_shipped_lm_eval_yaml_gives_the_same_items_as_the_jsonl():
    pytest.importorskip("lm_eval")
    from sdt.search.tasks import TASK_DIR

    from_yaml = load_task(f"{TASK_DIR}/basic_mc.yaml")
    from_jsonl = load_task("basic_mc")
    assert from_yaml.name == "basic_mc_yaml"

    def requests(task):  # what the scorer encodes: the prompt, and the prompt followed by each choice
        return [(i.prompt, [i.prompt + task.target_delimiter + c for c in i.choices], i.answer) for i in task.items]

    assert requests(from_yaml) == requests(from_jsonl)
