"""Run ``predict`` and ``slide`` batches locally or on a ``dask.distributed`` cluster.

The work is the same function either way (decode + classify a batch of image
paths, or read + classify a batch of slide tiles); an *executor* decides where
it runs:

- :class:`LocalExecutor`: in this process, batch after batch (what ``slide``
  does without ``--scheduler``; ``predict`` keeps its own threaded loop in
  :func:`breastcnn.inference.predict_paths`, sharing the per-chunk code).
- :class:`DaskExecutor`: on the workers of a running cluster
  (``--scheduler ADDRESS`` or ``BREASTCNN_SCHEDULER``), through joblib's Dask
  backend (``joblib.parallel_config(backend="dask")``). Results come back in
  input order (joblib's ordered generator) with at most ``2 x cores`` batches
  in flight, so memory stays bounded on the client too.

What a worker receives:

- the model as a :class:`ModelPayload`: the bytes of its file (and of the
  Keras metadata sidecar), broadcast once to every worker
  (``Client.scatter(broadcast=True)``; tasks take the Future). A worker
  process writes them to a private temporary folder, loads them with the same
  :func:`breastcnn.models.load_model` (no pickle of model objects, safe Keras
  loading, checked ONNX), removes the folder and caches the model by SHA-256;
- image paths or a slide path plus tile coordinates: workers read the files
  themselves, so they must see them at the same absolute paths (a shared
  filesystem);
- the same breastcnn version must be installed on every worker (checked: a
  mismatch fails the batch with a message naming both versions), with the
  extras the model and the slides need (``[keras]``, ``[onnx]``, ``[slide]``).

Nothing here imports dask until a :class:`DaskExecutor` is made.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from breastcnn import __version__
from breastcnn.errors import BreastCNNError, MissingDependencyError, UserInputError
from breastcnn.inference import _decode_chunk, check_threads, chunk_predictions
from breastcnn.models import load_model, model_spec
from breastcnn.models.keras_models import find_sidecar

SCHEDULER_ENV = "BREASTCNN_SCHEDULER"
"""Environment variable read when ``--scheduler`` is not given."""

DASK_INSTALL = "pip install 'breastcnn[dask]'"
CONNECT_TIMEOUT_S = 10.0
WORKER_WAIT_S = 30.0
MODEL_CACHE_SIZE = 2


def require_distributed():
    """Import ``dask.distributed``, or raise MissingDependencyError with the install command."""
    try:
        import distributed
    except ImportError as exc:
        raise MissingDependencyError(f"dask.distributed is not installed: {DASK_INSTALL} ({exc})") from None
    return distributed


# --------------------------------------------------------------------------- shipped objects


@dataclass(frozen=True)
class ModelPayload:
    """A model file's bytes (and its sidecar), to be loaded once per worker process."""

    name: str
    files: tuple[tuple[str, bytes], ...]
    digest: str
    version: str = __version__
    source: str = ""
    """The model file's path on the client (for messages)."""

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> ModelPayload:
        path = Path(path)
        names = [path]
        if path.suffix.lower() == ".keras":
            sidecar = find_sidecar(path)  # <name>.keras.json, or a legacy breastcnn.json
            if sidecar is not None:
                names.append(sidecar)
        files = tuple((p.name, p.read_bytes()) for p in names)
        digest = hashlib.sha256()
        for name, data in files:
            digest.update(name.encode() + b"\0" + data)
        return cls(path.name, files, digest.hexdigest(), source=str(path))

    def __repr__(self) -> str:  # shown in dask dashboards and errors, never the bytes
        return f"ModelPayload({self.name}, sha256={self.digest[:12]})"


@dataclass(frozen=True)
class SlideSource:
    """A slide for a worker to open itself (by absolute path; ``breastcnn.wsi.reader.resolve_reader``)."""

    path: str


_MODELS: collections.OrderedDict[str, object] = collections.OrderedDict()
_CACHE_LOCK = threading.Lock()
MODEL_LOADS: collections.Counter[str] = collections.Counter()
"""How many times this process loaded each shipped model (by digest): once, then the cache answers."""


def _check_version(payload_version: str) -> None:
    if payload_version != __version__:
        raise BreastCNNError(
            f"worker runs breastcnn {__version__} but the client runs {payload_version}; "
            "install the same version on every machine"
        )


def resolve_model(source):
    """A classifier from a local model (returned as is) or a :class:`ModelPayload` (loaded once, cached)."""
    if not isinstance(source, ModelPayload):
        return source
    _check_version(source.version)
    with _CACHE_LOCK:
        model = _MODELS.get(source.digest)
        if model is None:
            folder = tempfile.mkdtemp(prefix="breastcnn-model-")
            try:
                for name, data in source.files:
                    Path(folder, name).write_bytes(data)
                model = load_model(Path(folder, source.name))
                model.source = source.source or source.name  # messages name the client's file, not our copy
                MODEL_LOADS[source.digest] += 1
            except BreastCNNError as exc:  # e.g. the worker lacks the [onnx] or [keras] extra
                raise type(exc)(f"on worker {socket.gethostname()}, loading {source.name}: {exc}") from None
            finally:
                shutil.rmtree(folder, ignore_errors=True)  # the folder and files we just wrote
            _MODELS[source.digest] = model
            while len(_MODELS) > MODEL_CACHE_SIZE:
                _MODELS.popitem(last=False)
        return model


# --------------------------------------------------------------------------- executors


class LocalExecutor:
    """Runs tasks here, in order, one at a time (the model and readers are the local objects)."""

    remote = False

    def model_source(self, model, model_path=None):
        return model

    def slide_source(self, reader):
        return reader

    def map(self, func: Callable, tasks: Iterable[tuple]) -> Iterator:
        for args in tasks:
            yield func(*args)


@dataclass
class DaskExecutor:
    """Runs tasks on a dask.distributed cluster through joblib's Dask backend; results in input order."""

    client: object
    _payloads: dict = field(default_factory=dict)
    remote = True

    def model_source(self, model, model_path=None):
        """The model's :class:`ModelPayload`, broadcast to every worker once per executor (a dask Future:
        the tasks that take it get the worker's copy, so nothing is sent again per batch or per slide)."""
        if model_path is None:
            raise ValueError("a DaskExecutor ships the model file: pass model_path")
        key = os.path.abspath(model_path)
        if key not in self._payloads:
            [future] = self.client.scatter([ModelPayload.from_path(model_path)], broadcast=True, hash=False)
            self._payloads[key] = future
        return self._payloads[key]

    def slide_source(self, reader):
        return SlideSource(os.path.abspath(reader.path))

    def map(self, func: Callable, tasks: Iterable[tuple]) -> Iterator:
        from joblib import Parallel, delayed, parallel_config

        # The backend is built when the config is entered; the Parallel object keeps it, so the
        # generator can be consumed after the context has closed.
        with parallel_config(backend="dask", client=self.client, wait_for_workers_timeout=WORKER_WAIT_S):
            parallel = Parallel(n_jobs=-1, return_as="generator", batch_size=1, pre_dispatch="2*n_jobs")
        return parallel(delayed(func)(*args) for args in tasks)


@contextlib.contextmanager
def connect(address: str) -> Iterator[DaskExecutor]:
    """A :class:`DaskExecutor` on the scheduler at ``address``; the client is closed on exit.

    Raises UserInputError naming the address when it cannot be reached or has no worker.
    """
    distributed = require_distributed()
    try:
        client = distributed.Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise UserInputError(
            f"--scheduler {address}: cannot connect to a dask scheduler "
            f"({type(exc).__name__}: {' '.join(str(exc).split())})"
        ) from None
    try:
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except (TimeoutError, OSError) as exc:
            raise UserInputError(
                f"--scheduler {address}: no dask worker joined within {WORKER_WAIT_S:g} s "
                f"({type(exc).__name__}); start one with `dask worker {address}`"
            ) from None
        yield DaskExecutor(client)
    finally:
        client.close()


def scheduler_address(option: str | None) -> str | None:
    """``--scheduler`` if given, else ``$BREASTCNN_SCHEDULER``, else None (run locally)."""
    value = option if option is not None else os.environ.get(SCHEDULER_ENV)
    value = (value or "").strip()
    return value or None


# --------------------------------------------------------------------------- predict on a cluster


def predict_paths_task(
    model_source,
    paths: Sequence[str],
    read_paths: Sequence[str],
    threshold: float,
    batch_size: int,
    threads: int | None = None,
) -> list:
    """Decode and classify one batch (runs on a worker); ``read_paths`` are the absolute paths to open."""
    model = resolve_model(model_source)
    size = model_spec(model).image_size
    decoded = _decode_chunk(list(read_paths), size)
    # error messages name the path as the user gave it
    decoded = [
        (img, None if err is None else err.replace(read, shown, 1))
        for (img, err), read, shown in zip(decoded, read_paths, paths, strict=True)
    ]
    return chunk_predictions(model, list(paths), decoded, threshold, batch_size, threads)


def predict_paths_distributed(
    executor: DaskExecutor,
    model,
    model_path,
    paths: Sequence[str],
    threshold: float = 0.5,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> Iterator:
    """Like :func:`breastcnn.inference.predict_paths`, on the cluster: tasks of ``batch_size`` images.

    Yields :class:`~breastcnn.inference.Prediction` in input order. ``threads``:
    engine threads of a NumPy model on each worker (None: the model's setting).
    """
    if not 0.0 <= threshold <= 1.0:
        raise UserInputError(f"--threshold must be in [0, 1], got {threshold}")
    check_threads(threads)
    source = executor.model_source(model, model_path)
    step = max(1, batch_size)
    tasks = [
        (
            source,
            list(paths[i : i + step]),
            [os.path.abspath(p) for p in paths[i : i + step]],
            threshold,
            batch_size,
            threads,
        )
        for i in range(0, len(paths), step)
    ]
    for results in executor.map(predict_paths_task, tasks):
        yield from results
        if progress:
            progress(len(results))
