"""Small filesystem helpers: atomic writes, overwrite protection, directory locks.

Every output of the tool goes through here so that an interrupted command
never leaves a half-written file behind, an existing result is never
overwritten without ``--force``, and two processes never write into the same
run or split directory at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

from breastcnn.errors import UserInputError

try:  # POSIX; elsewhere directories are simply not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".breastcnn.lock"
"""The lock file a command holds in a run or split directory while it writes there (holds its pid)."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file next to ``path``; rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched.
    The file gets the mode a plain ``open(path, "w")`` would give it under the
    current umask (0644 under 0022), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_mode())
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not exc.filename:
            # a short write ("1990656 requested and 982912 written": a full disk) names no file
            exc.filename = str(path)
        raise


def default_mode(directory: bool = False) -> int:
    """The mode a new file (0o666) or directory (0o777) gets under the current umask.

    For outputs made through mkstemp/mkdtemp (always 0600/0700): colleagues on a
    shared server must be able to read results as they could any other file.
    """
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    """The process umask: from /proc (Linux) when possible, since setting and restoring it
    (the portable way to read it) briefly changes it for every thread."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_overwrite(path: str | os.PathLike, force: bool, option: str = "--force") -> None:
    """Refuse to overwrite an existing file or non-empty directory unless ``force``."""
    path = Path(path)
    exists = path.is_file() or (path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir()))
    if exists and not force:
        raise UserInputError(f"{path} already exists; pass {option} to overwrite it")


# --------------------------------------------------------------------------- locks


class DirLock:
    """An exclusive lock on a directory: ``fcntl.flock`` on ``<dir>/.breastcnn.lock``, which holds the pid.

    ``acquire()`` never waits: a directory in use is a :class:`UserInputError`
    naming the holder's pid. The kernel drops a flock when its holder dies, however
    it dies (SIGKILL included), so a stale lock file never blocks anyone. The file is
    removed on release; a process that opened it just before is detected (its inode
    is no longer the path's) and retries on the new file.
    """

    def __init__(self, directory: str | os.PathLike, what: str = "directory"):
        self.path = Path(directory) / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        if fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise UserInputError(
                    f"{self.what} {self.path.parent} is in use by another breastcnn process (pid {holder}); "
                    "wait for it to finish or stop it"
                ) from None
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)  # released and removed by its holder between our open and flock: use the new file
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def locked_directory(
    path: str | os.PathLike, what: str = "directory", removable: Collection[str] = (), created: bool | None = None
) -> Iterator[bool]:
    """Create ``path`` if needed and hold its :class:`DirLock` for the block; yields whether it was created.

    When the block fails and the directory was created here (or by the caller,
    who says so with ``created=True``), it is removed again if it holds nothing
    but (empty folders and) files named in ``removable``: a failed start leaves
    nothing behind, a run that wrote results keeps them.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{path} exists and is not a directory")
    if created is None:
        try:
            path.mkdir(parents=True)
            created = True
        except FileExistsError:
            created = False
    lock = DirLock(path, what)
    try:
        lock.acquire()
    except BaseException:
        if created:
            remove_if_unused(path, removable)
        raise
    try:
        yield created
    except BaseException:
        lock.release()
        if created:
            remove_if_unused(path, removable)
        raise
    lock.release()


def remove_if_unused(directory: Path, removable: Collection[str] = ()) -> bool:
    """Remove ``directory`` if every file under it is named in ``removable`` (empty folders count as unused)."""
    files = [p for p in directory.rglob("*") if not p.is_dir() or p.is_symlink()]
    if any(p.name not in removable or p.is_symlink() for p in files):
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp(\.keras)?$")


def remove_stale_temps(directory: str | os.PathLike, names: Collection[str]) -> list[Path]:
    """Delete temporary files that :func:`atomic_write` left for ``names`` in ``directory`` (a killed write).

    Only call this while holding the directory's lock (no writer of ours can be
    using them). A name matches ``.<name>.<random>.tmp`` (and Keras'
    ``.<stem>.<random>.tmp.keras``); other files are never touched.
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    wanted = set(names) | {Path(n).stem for n in names if n.endswith(".keras")}
    for path in directory.iterdir():
        match = _TEMP_RE.match(path.name)
        if match and match.group("name") in wanted and path.is_file() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path)
    return removed


def is_our_file(name: str, names: Collection[str]) -> bool:
    """Whether a file called ``name`` is one of ``names`` or a temporary file :func:`atomic_write` left for one."""
    if name in names:
        return True
    match = _TEMP_RE.match(name)
    wanted = set(names) | {Path(n).stem for n in names if n.endswith(".keras")}
    return bool(match and match.group("name") in wanted)


def remove_recorded(
    root: str | os.PathLike, owned: Iterable[str], protected: Sequence[Path] = (), folders: Iterable[str] = ()
) -> list[Path]:
    """Delete the files in ``owned`` (POSIX paths relative to ``root``) and then the folders they leave empty.

    The one deletion routine behind ``--force`` (``split``, ``compare``): only files recorded as
    ours are deleted, never a folder with anything else in it, never ``root`` itself. ``folders``:
    folders (relative) that are ours too, removed (with the parents they leave empty) when nothing
    else is in them, also when no file of ``owned`` was in them. A path whose folder resolves outside
    ``root`` (a symlinked folder) or into a ``protected`` tree (resolved paths: the data a split
    reads) is left alone. Returns the deepest folders that still hold someone else's files.
    """
    root = Path(root)
    root_real = root.resolve()

    def inside(path: Path) -> bool:
        folder = path.parent.resolve()
        if folder != root_real and root_real not in folder.parents:
            return False
        real = folder / path.name
        return not any(real == tree or tree in real.parents for tree in protected)

    emptied = {root / rel for rel in folders if (root / rel).is_dir() and inside(root / rel)}
    for rel in sorted(set(owned)):
        path = root / rel
        if inside(path) and (path.is_symlink() or path.is_file()):
            path.unlink()
            emptied.add(path.parent)
    full: set[Path] = set()
    for folder in sorted(emptied, key=lambda p: len(p.parts), reverse=True):
        while root in folder.parents:
            try:
                folder.rmdir()
            except FileNotFoundError:  # an earlier chain removed it
                break
            except OSError:  # not empty: someone's files are in it
                full.add(folder)
                break
            folder = folder.parent
    # each kept place named once, at the deepest folder (its parents are full because of it)
    return sorted(f for f in full if not any(f in other.parents for other in full))
