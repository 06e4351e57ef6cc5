"""The Docker images' recipes pass hadolint (Docker itself cannot run in CI)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import ROOT

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
