"""Shared fixtures: tiny models of every family (built in code) and the shared evaluation text."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# pytest-xdist workers (make test runs two) share the cores: a test's torch threads and a CLI it
# runs in a subprocess get this process's share (cores this process may use, not the host's)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
CORE_SHARE = max(1, len(os.sched_getaffinity(0)) // WORKERS) if hasattr(os, "sched_getaffinity") else 1
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(CORE_SHARE))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "wikitext2"


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    """WikiText-2 test split beside the checkout (../shared); skip where it is absent."""
    path = SHARED_DATA / "wiki.test.raw"
    if not path.exists():
        pytest.skip("../shared/data/wikitext2 not found beside the checkout")
    return path


@pytest.fixture(scope="module", autouse=True)
def _module_temp_dirs_removed(tmp_path_factory):
    """CI's disk is small and the suite writes hundreds of model copies: what a module's fixtures
    wrote under the temp root goes when the module ends. Session fixtures name their folders
    'session-*' and stay; a test's own tmp_path ('test_*') follows tmp_path_retention_policy
    (kept when the test failed)."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    for path in set(base.iterdir()) - before:
        if not path.name.startswith(("session-", "test_")):
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _torch_threads(request):
    """One torch thread for the tiny models (their small matmuls and column-by-column solvers run
    faster on one); the tests marked slow (the embedded real models) get this worker's share of
    the cores: more threads than cores make OpenMP's spinning threads wait on each other and a
    test many times slower. Restored after each test, so no test's own choice leaks into the ones
    after it."""
    import torch

    before = torch.get_num_threads()
    slow = request.node.get_closest_marker("slow") is not None
    torch.set_num_threads(CORE_SHARE if slow else 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request):
    """The suite's numbers are CPU numbers: where a GPU is, kompakt would pick it by default, so
    tests run with --device cpu unless marked `cuda` (those choose their device themselves)."""
    if request.node.get_closest_marker("cuda") is not None:
        yield
        return
    from kompakt.model.device import use_device

    with use_device("cpu"):
        yield


@pytest.fixture
def one_thread():
    """One torch thread: tiny matrices and column-by-column solvers run faster (much faster on a
    loaded machine); the previous count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli(capsys):
    """Run the kompakt CLI in this process: cli(argv) -> (exit code, stdout, stderr)."""
    from kompakt.cli.app import main

    def run(argv: list[str]) -> tuple[int, str, str]:
        code = 0
        try:
            main(argv)
        except SystemExit as done:
            code = done.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def laptop_text(tmp_path_factory) -> Path:
    """400 lines of a 14-word cycle: enough text to calibrate, distil and evaluate tiny models."""
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    words = "the model runs on a small laptop and the data stays local while people read".split()
    path.write_text("\n".join(" ".join(words[(i + j) % len(words)] for j in range(14)) + "." for i in range(400)))
    return path
