"""BLAS thread control (threadpoolctl) and joblib sharding of big batches.

Sharding runs shards of a batch in joblib *threads* (NumPy releases the GIL)
with BLAS limited to one thread each, so the two never oversubscribe cores.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_info

_controller: ThreadpoolController | None = None


def _get_controller() -> ThreadpoolController:
    # Built once (it scans the loaded libraries); limiting through it then costs ~3 us.
    global _controller
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller


@contextlib.contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Limit BLAS threads to ``n`` inside the block (None: leave as is). Cheap enough per batch."""
    if n is None:
        yield
        return
    with _get_controller().limit(limits=int(n), user_api="blas"):
        yield


def blas_thread_count() -> int:
    """Current number of BLAS threads (max over loaded BLAS libraries; 1 when none found)."""
    counts = [info.get("num_threads", 1) for info in threadpool_info() if info.get("user_api") == "blas"]
    return max(counts) if counts else 1


def resolve_jobs(jobs: int | None) -> int:
    """jobs <= 0 or None means all cores."""
    cores = os.cpu_count() or 1
    if jobs is None or jobs <= 0:
        return cores
    return int(jobs)


def map_batches(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int, jobs: int = 1) -> np.ndarray:
    """Apply ``fn`` to consecutive batches of ``x`` and concatenate (along axis 0).

    jobs == 1: a plain loop, BLAS uses its own threads. jobs > 1: batches run in
    joblib threads with BLAS limited to one thread per worker. ``fn`` must not
    mutate shared state (Sequential uses cache-free forward passes).
    """
    n = x.shape[0]
    starts = range(0, n, max(int(batch_size), 1))
    jobs = resolve_jobs(jobs)
    if jobs == 1 or len(starts) <= 1:
        outs = [fn(x[s : s + batch_size]) for s in starts]
    else:
        from joblib import Parallel, delayed

        with blas_threads(1):
            outs = Parallel(n_jobs=min(jobs, len(starts)), prefer="threads")(
                delayed(fn)(x[s : s + batch_size]) for s in starts
            )
    return np.concatenate(outs, axis=0) if outs else np.empty((0,), np.float32)
