"""BLAS thread control (threadpoolctl), batch chunking over engine threads, joblib sharding.

Two levels of parallelism, both with threads (NumPy releases the GIL):

- inside one forward/backward pass, layers cut the batch into fixed-size
  *chunks* (sized to stay in cache) and run them with :func:`map_chunks` on
  the engine threads set by :func:`engine_threads` (``Sequential.threads``);
  the chunking never depends on the thread count and partial results are
  combined in chunk order, so 1 and N threads give bit-identical results;
- ``predict(jobs=N)`` shards whole batches over joblib threads (:func:`map_batches`).

In both, BLAS is limited to one thread per worker so the levels never oversubscribe cores.

Two small types let neighbouring layers share one chunk pass (``nn/steps.py``): :class:`Pending`, an
array whose rows are written by its consumer's chunks, and :class:`ChunkResults`, per-chunk results
collected in chunk order. :func:`observe_chunks` records how many threads the chunk maps really used.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_info

_blas_libs: list | None = None


def _blas_controllers() -> list:
    # Built once (it scans the loaded libraries): the documented ``lib_controllers`` of the BLAS libraries
    global _blas_libs
    if _blas_libs is None:
        _blas_libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _blas_libs


class blas_threads:  # noqa: N801  (a context manager used like a function)
    """Limit BLAS threads to ``n`` inside the block (None: leave as is).

    Sets and restores only libraries not already at ``n``, through the controllers found once:
    batch-1 inference calls it every time, and threadpoolctl's ``limit()`` rescans the libraries
    (a class: cheaper to enter and leave than a generator-based context manager).
    """

    __slots__ = ("n", "changed")

    def __init__(self, n: int | None):
        self.n = None if n is None else int(n)
        self.changed: list = []

    def __enter__(self) -> None:
        n = self.n
        if n is None:
            return
        for lib in _blas_controllers():
            before = lib.get_num_threads()
            if before != n:
                lib.set_num_threads(n)
                self.changed.append((lib, before))

    def __exit__(self, *exc) -> None:
        for lib, before in self.changed:
            lib.set_num_threads(before)
        self.changed = []


def blas_thread_count() -> int:
    """Current number of BLAS threads (max over loaded BLAS libraries; 1 when none found)."""
    counts = [info.get("num_threads", 1) for info in threadpool_info() if info.get("user_api") == "blas"]
    return max(counts) if counts else 1


@functools.lru_cache(maxsize=1)
def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else ``os.cpu_count()``): the default number of
    engine threads and of ``--jobs -1``. Asked once (a system call is too slow for batch-1 inference)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_jobs(jobs: int | None) -> int:
    """jobs <= 0 or None means all available cores."""
    if jobs is None or jobs <= 0:
        return available_cores()
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
    if len(outs) == 1:
        return outs[0]
    return np.concatenate(outs, axis=0) if outs else np.empty((0,), np.float32)


# -- engine threads: chunks of one batch, inside a layer ----------------------------------------------------------

_local = threading.local()  # per calling thread: how many engine threads its layers may use
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def current_threads() -> int:
    """Engine threads available to layers called from this thread (1 unless inside :func:`engine_threads`)."""
    return getattr(_local, "threads", 1)


class engine_threads:  # noqa: N801  (a context manager used like a function)
    """Let layers run their batch chunks on ``n`` threads inside the block (None: leave as is; <= 0: all cores).

    Only the calling thread is affected (joblib workers of ``predict(jobs=...)`` keep 1).
    """

    __slots__ = ("n", "previous")

    def __init__(self, n: int | None):
        self.n = n
        self.previous = None

    def __enter__(self) -> None:
        if self.n is not None:
            self.previous = current_threads()
            _local.threads = resolve_jobs(self.n)

    def __exit__(self, *exc) -> None:
        if self.n is not None:
            _local.threads = self.previous


def _executor(workers: int) -> ThreadPoolExecutor:
    # One persistent pool (threads are reused: starting them per call would cost more than a small layer)
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="breastcnn-engine")
        return _pool


def chunk_size(bytes_per_sample: int, budget: int = 4 << 20) -> int:
    """Samples per chunk so that a chunk's working set is about ``budget`` bytes (at least 1).

    Depends on the layer's shapes only, never on the thread count (determinism).
    The default budget was chosen with ``benchmarks/bench_engine.py`` (train step, 1 and 2 threads):
    smaller chunks pay more per-call overhead and GIL hand-offs, larger ones fall out of cache.
    """
    return max(1, int(budget) // max(int(bytes_per_sample), 1))


def chunk_ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    """``range(n)`` cut into an even number of near-equal parts of at most ``chunk`` items.

    Even and equal so that two threads finish together (32 images in chunks of 5 would be
    5,5,5,5,5,5,2: 17 against 15); fixed by ``n`` and ``chunk`` only, never by the thread count.
    """
    parts = -(-n // max(int(chunk), 1))
    parts += parts % 2
    parts = min(parts, n)
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(pairwise(bounds))


def map_chunks(fn: Callable[[int, int], object], n: int, chunk: int) -> list:
    """``[fn(start, stop) for each chunk of range(n)]``, the chunks run on the engine threads.

    Results come back in chunk order whatever thread ran them, so reductions
    over them are deterministic. Chunks are taken from a shared counter
    (a busy core simply takes fewer); the calling thread works too. ``fn``
    must only write to its own rows of shared outputs.
    """
    if n <= chunk:  # one chunk (small batches, batch-1 inference): no bookkeeping
        return [fn(0, n)]
    ranges = chunk_ranges(n, chunk)
    threads = min(current_threads(), len(ranges))
    for log in _observers:
        log.record(threads)
    if threads <= 1:
        return [fn(a, b) for a, b in ranges]
    results: list = [None] * len(ranges)
    errors: list = []
    lock = threading.Condition()
    state = {"next": 0, "busy": 0}  # next chunk to claim; chunks claimed by pool threads and not done

    def claim(worker: bool) -> int:
        with lock:
            i = state["next"]
            state["next"] = i + 1
            if worker and i < len(ranges):
                state["busy"] += 1
            return i

    def work(worker: bool) -> None:
        while (i := claim(worker)) < len(ranges):
            try:
                results[i] = fn(*ranges[i])
            except BaseException as exc:  # re-raised in the calling thread
                errors.append(exc)
            finally:
                if worker:
                    with lock:
                        state["busy"] -= 1
                        lock.notify_all()

    with blas_threads(1):  # BLAS limits are process-wide: one BLAS thread per engine thread
        pool = _executor(threads - 1)
        for _ in range(threads - 1):
            pool.submit(work, True)
        work(False)
        # Wait only for chunks a pool thread actually took: a thread that wakes up after the calling
        # thread has claimed every chunk finds nothing left (on a VM, waking a thread can take as long
        # as a small layer's whole pass).
        with lock:
            lock.wait_for(lambda: state["busy"] == 0)
    if errors:
        raise errors[0]
    return results


def ordered_sum(parts: list):
    """Sum of ``parts`` left to right (a fixed order: deterministic float results)."""
    total = parts[0].copy() if isinstance(parts[0], np.ndarray) else parts[0]
    for part in parts[1:]:
        total += part
    return total


# -- chunk hooks between neighbouring layers ------------------------------------------------------------------------


class Pending:
    """An (N, ...) ``array`` whose rows may not be written yet: ``fill(a, b)`` writes rows ``a:b``.

    A layer that works in chunks of rows calls ``fill`` at the start of each of its chunks (the rows
    are then in cache when it reads them: a BatchNorm's normalisation runs inside the next conv's
    chunks); any other consumer calls :meth:`complete`. ``fill`` None: the array is complete.
    ``chunk``: rows per chunk when :meth:`complete` runs ``fill`` on its own.
    """

    __slots__ = ("array", "fill", "chunk")

    def __init__(self, array: np.ndarray, fill: Callable[[int, int], None] | None = None, chunk: int = 1):
        self.array = array
        self.fill = fill
        self.chunk = chunk

    def take(self) -> tuple[np.ndarray, Callable[[int, int], None] | None]:
        """``(array, fill)`` for a consumer that calls ``fill`` on every chunk of rows itself."""
        fill, self.fill = self.fill, None
        return self.array, fill

    def complete(self) -> np.ndarray:
        """The array with every row written (``fill`` run over all rows in chunks, once)."""
        fill, self.fill = self.fill, None
        if fill is not None:
            map_chunks(fill, self.array.shape[0], self.chunk)
        return self.array


class ChunkResults:
    """A chunk hook ``hook(array, a, b)`` that keeps ``fn(array, a, b)`` per chunk.

    Chunks may run on any engine thread and in any order; :meth:`ordered` returns the results in
    chunk order, so reductions over them are deterministic.
    """

    __slots__ = ("fn", "parts")

    def __init__(self, fn: Callable[[np.ndarray, int, int], object]):
        self.fn = fn
        self.parts: dict[int, object] = {}

    def __call__(self, array: np.ndarray, a: int, b: int) -> None:
        self.parts[a] = self.fn(array, a, b)

    def ordered(self) -> list:
        return [self.parts[a] for a in sorted(self.parts)]


class ChunkLog:
    """What :func:`map_chunks` did inside :func:`observe_chunks`: ``calls`` (maps with more than one
    chunk) and ``max_threads`` (the most threads one of them ran on, the caller included)."""

    def __init__(self):
        self.calls = 0
        self.max_threads = 0
        self._lock = threading.Lock()

    def record(self, threads: int) -> None:
        with self._lock:
            self.calls += 1
            self.max_threads = max(self.max_threads, threads)


_observers: list[ChunkLog] = []


@contextlib.contextmanager
def observe_chunks() -> Iterator[ChunkLog]:
    """Record the thread use of every multi-chunk :func:`map_chunks` call inside the block (any calling thread).

    The engine's own bookkeeping, for tests and benchmarks that must show the thread setting in force.
    """
    log = ChunkLog()
    _observers.append(log)
    try:
        yield log
    finally:
        _observers.remove(log)
