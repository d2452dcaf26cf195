"""Numba's thread count for the ranking kernels."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numba
from scanpy import settings


@contextmanager
def numba_threads() -> Iterator[int]:
    """Run numba on ``scanpy.settings.n_jobs`` threads (``None`` or ``-1``: all).

    Numba's OpenMP threading layer sets OpenMP's thread count when it starts its threads, which changes torch's
    (:func:`torch.get_num_threads`) as well; torch's count is put back afterwards, and only if it changed. Putting it
    back calls :func:`torch.set_num_threads`, which lets MKL start threads inside torch's own parallel loops, and
    numba's layer has allowed OpenMP to nest them: on 2 cores each training step of a model from scratch then took
    eight times as long (4.4 s instead of 0.55 s) from the first call after torch had run.
    """
    n_jobs = settings.n_jobs
    n = numba.config.NUMBA_NUM_THREADS if n_jobs is None or n_jobs < 1 else min(n_jobs, numba.config.NUMBA_NUM_THREADS)
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch is not None else None
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield n
    finally:
        numba.set_num_threads(previous)
        if torch_threads is not None and torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
