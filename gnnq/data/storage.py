"""Where dataset files are read and written, and the errors when they are missing or damaged.

PyG and OGB write ``processed/`` next to ``raw/`` and download into the dataset folder. gnnq
never lets them write into a read-only folder: the raw files are then linked into a writable
cache with the same layout. Before anything downloads, the files are checked and the download
host is probed, so an offline machine fails in seconds with a message saying what to copy where.
"""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar
from urllib.parse import urlsplit

from gnnq.errors import GnnqError

DEFAULT_ROOT = "data"
DEFAULT_CACHE = "~/.cache/gnnq/data"
PROBE_TIMEOUT_S = 3.0

T = TypeVar("T")


def resolve_root(root: str = DEFAULT_ROOT) -> Path:
    """The data root: ``data.root``, or ``$GNNQ_DATA`` while ``data.root`` keeps its default
    ``"data"``. Relative paths are taken from the current directory."""
    env = os.environ.get("GNNQ_DATA")
    if env and root == DEFAULT_ROOT:
        root = env
    return Path(root).expanduser().absolute()


def cache_root() -> Path:
    """Writable stand-in for read-only roots: ``$GNNQ_CACHE``, default ``~/.cache/gnnq/data``."""
    return Path(os.environ.get("GNNQ_CACHE") or DEFAULT_CACHE).expanduser().absolute()


def is_writable(folder: Path) -> bool:
    """Whether gnnq may write into ``folder``, or create it inside its nearest existing parent.

    ``os.access`` says yes to root even where no write bit is set (the shared data copy is
    such a folder), so a folder without any write bit counts as read-only as well.
    """
    while not folder.exists():
        folder = folder.parent
    return os.access(folder, os.W_OK | os.X_OK) and bool(folder.stat().st_mode & 0o222)


def working_folder(src: Path, folder: str) -> Path:
    """The folder PyG/OGB get for the dataset whose files are in ``src`` (``root/folder``):
    ``src`` itself when writable, else a mirror of it at ``cache_root()/folder``."""
    if is_writable(src):
        return src
    work = cache_root() / folder
    if not is_writable(work):
        raise GnnqError(
            f"Neither the dataset folder {src} nor the cache folder {work} is writable, and "
            f"loading needs one of them to store processed data. Set the GNNQ_CACHE environment "
            f"variable to a writable folder, or copy the dataset to a writable data.root.")
    if src.is_dir():
        _mirror(src, work)
    return work


def _is_processed(relative: Path) -> bool:
    return any(part.startswith("processed") for part in relative.parts)


def _mirror(src: Path, dst: Path) -> None:
    """Symlink every file of ``src`` except processed data into ``dst``, same layout.

    Links that no longer match ``src`` (another root, a removed file) are replaced; processed
    data in ``dst`` is then dropped because it may have been built from the old files.
    """
    wanted = {f.relative_to(src): f for f in src.rglob("*")
              if f.is_file() and not _is_processed(f.relative_to(src))}
    changed = False
    # missing_ok / FileExistsError: parallel runs (a joblib sweep) may mirror at the same time.
    for link in [p for p in dst.rglob("*") if p.is_symlink()]:
        if wanted.get(link.relative_to(dst)) != Path(os.readlink(link)):
            link.unlink(missing_ok=True)
            changed = True
    for relative, target in wanted.items():
        link = dst / relative
        if link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)  # a copy downloaded into the cache earlier: the root's wins
        try:
            link.symlink_to(target)
        except FileExistsError:
            pass
        changed = True
    if changed:
        for processed in [p for p in dst.rglob("processed*") if p.is_dir()]:
            shutil.rmtree(processed)


@contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold the dataset folder's lock until the block ends.

    Parallel runs (sharded jobs, a joblib sweep) load the same dataset at once; without the
    lock one of them reads the processed file while another is still writing it. The lock
    file sits beside the folder, which a download may replace whole.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def unlink_symlinks(folder: Path) -> None:
    """Remove the file links in ``folder`` (a cache mirror, or a root made by ``cp -rs``)
    before PyG/OGB download into it: they overwrite files in place, which would write through
    a link into the (read-only) original."""
    for path in [p for p in folder.rglob("*") if p.is_symlink()]:
        path.unlink()


def _reachable(url: str) -> bool:
    """Whether the host of ``url`` accepts a TCP connection within ``PROBE_TIMEOUT_S``.

    The probe runs in a daemon thread because a DNS lookup ignores socket timeouts.
    """
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((parts.hostname, port), timeout=PROBE_TIMEOUT_S).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return bool(answered)


def check_files(name: str, src: Path, work: Path, folder: str, files: Sequence[str],
                url: str, download: str) -> bool:
    """Check that ``files`` (relative to the dataset folder) are there; return whether some
    must be downloaded, or raise when they are missing and cannot be."""
    missing = [f for f in files if not (work / f).exists()]
    if not missing:
        return False
    host = urlsplit(url).hostname
    if download == "never":
        reason = "downloading is off (data.download=never)"
    elif not _reachable(url):
        reason = (f"downloading is on (data.download=auto) but {host} did not answer within "
                  f"{PROBE_TIMEOUT_S:g} s")
    else:
        return True
    cache_note = "" if work == src else f" (and its cache copy {work})"
    raise GnnqError(
        f"Dataset {name!r} is not available: the folder {src}{cache_note} lacks {len(missing)} "
        f"of the {len(files)} files the dataset needs ({', '.join(missing)}), and {reason}. "
        f"To fix this, copy the files into {src}, or point data.root (or the GNNQ_DATA "
        f"environment variable) at a folder that holds {folder}/ with all of them, or allow "
        f"downloading (data.download=auto) on a machine that can reach {host}.")


def read_or_explain(name: str, src: Path, work: Path, files: Sequence[str], processed: Path,
                    downloading: bool, read: Callable[[], T]) -> T:
    """Run ``read`` (PyG/OGB loading from ``work``) and turn its failures into a GnnqError.

    When processed data existed beforehand it may be stale or damaged: it is ours to rebuild,
    so it is deleted and ``read`` retried once from the raw files.
    """
    had_processed = processed.is_dir() and any(processed.iterdir())
    try:
        return read()
    except Exception as err:
        if not had_processed:
            raise _read_error(name, src, work, files, downloading, err) from err
    shutil.rmtree(processed)
    try:
        return read()
    except Exception as err:
        raise _read_error(name, src, work, files, downloading, err) from err


def _failed_file(err: Exception, work: Path, files: Sequence[str]) -> str | None:
    """The needed file the failing reader was reading, if a frame of the traceback holds its
    path (PyG's readers keep it in a local) or its open file object."""
    by_path = {str(work / f): f for f in files}
    tb = err.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            path = getattr(value, "name", None) if isinstance(value, io.IOBase) else value
            if isinstance(path, (str, Path)) and str(path) in by_path:
                return by_path[str(path)]
        tb = tb.tb_next
    return None


def _read_error(name: str, src: Path, work: Path, files: Sequence[str], downloading: bool,
                err: Exception) -> GnnqError:
    detail = (str(err).strip().splitlines() or [""])[0][:300]
    cause = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
    if downloading:
        return GnnqError(
            f"Downloading the files of dataset {name!r} into {work} failed ({cause}). Check the "
            f"network connection and try again, or copy the files ({', '.join(files)}) into "
            f"{src} by hand.")
    culprit = _failed_file(err, work, files)
    where = f"reading {culprit} failed" if culprit else "reading its files failed"
    return GnnqError(
        f"Could not read dataset {name!r} from {src}: {where} ({cause}). The files "
        f"({', '.join(files)}) look damaged or incomplete: restore "
        f"{culprit or 'them'} from the original source, or delete the damaged files and load "
        f"with data.download=auto to fetch fresh copies.")
