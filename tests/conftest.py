"""The tiny world shared by the tests: a random-weight SD teacher and webdataset shards,
built locally by the project's own scripts."""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))

RESOLUTION = 64


def run_script(*args, env=None, timeout=600):
    """Run a Python script of the repo in a fresh interpreter; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    from make_tiny_teacher import make_teacher

    path = str(tmp_path_factory.mktemp("teacher") / "tiny-sd")
    make_teacher(path, "tiny", seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    from make_shards import write_shards

    directory = str(tmp_path_factory.mktemp("shards"))
    write_shards(directory, num_shards=3, samples_per_shard=12, resolution=RESOLUTION, seed=0)
    return os.path.join(directory, "{00000..00002}.tar")
