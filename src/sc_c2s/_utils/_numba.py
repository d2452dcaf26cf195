"""Numba's thread count for the ranking kernels, and one kernel at a time where numba's threads need it."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numba
from scanpy import settings

#: Held while a kernel runs on numba's workqueue threading layer, which aborts the process when two threads launch
#: parallel kernels at once (Dask's threaded scheduler ranking two chunks, the threads of a Dask worker).
_WORKQUEUE = threading.RLock()


@contextmanager
def numba_threads() -> Iterator[int]:
    """Run numba on ``scanpy.settings.n_jobs`` threads (``None`` or ``-1``: all).

    Numba's OpenMP threading layer sets OpenMP's thread count when it starts its threads, which changes torch's
    (:func:`torch.get_num_threads`) as well; torch's count is put back afterwards, and only if it changed. Putting it
    back calls :func:`torch.set_num_threads`, which lets MKL start threads inside torch's own parallel loops, and
    numba's layer has allowed OpenMP to nest them: on 2 cores each training step of a model from scratch then took
    eight times as long (4.4 s instead of 0.55 s) from the first call after torch had run.

    Where numba runs on its workqueue layer (no OpenMP or TBB library found: e.g. slim container images), the kernels
    of several threads run one after another; so do the first kernels of a process, before the layer is chosen.
    """
    with nullcontext() if _threadsafe_layer() else _WORKQUEUE:
        n_jobs = settings.n_jobs
        n = (
            numba.config.NUMBA_NUM_THREADS
            if n_jobs is None or n_jobs < 1
            else min(n_jobs, numba.config.NUMBA_NUM_THREADS)
        )
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


def _threadsafe_layer() -> bool:
    """Whether numba's threading layer is one that several threads may launch kernels on at once."""
    try:
        return numba.threading_layer() != "workqueue"
    except ValueError:  # numba's threads have not started yet, so no layer is chosen
        return False
