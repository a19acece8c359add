"""Thread count for the column-by-column solvers (GPTQ, SparseGPT) on CPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def solver_threads(device: torch.device) -> Iterator[None]:
    """Run a column-by-column solver with one intra-op thread on CPU (restored after).

    GPTQ's and SparseGPT's inner loops are many tiny [out, 1] x [1, block] updates; with several
    threads every op pays a synchronisation cost that dominates. Measured on the 2-core dev box
    under load (torch 2.13): SparseGPT on 576x576 / 1536x576 / 576x1536 weights took 0.4 / 0.9 /
    2.2 s with 1 thread and 14 / 11 / 31 s with 2. Layer forwards and Hessians keep all threads;
    on GPUs this does nothing.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
