"""Writing without losing anything: every file and directory is written under a temporary name
beside its target and renamed into place, so an interrupted write leaves the old one (or none);
and an existing output is not replaced unless the user said so."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slimtune.errors import SlimtuneError


def prepare_out_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty directory unless `overwrite`; return the path."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise SlimtuneError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SlimtuneError(
            f"output directory {out} exists and is not empty (use --overwrite / overwrite=True)"
        )
    return out


def check_free(path: Path, overwrite: bool) -> None:
    """Refuse an existing file or non-empty directory unless `overwrite`."""
    taken = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if taken and not overwrite:
        raise SlimtuneError(f"{path} already exists; pass --overwrite to replace it")


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, when the disk refused it (full, read-only, I/O error …); else None.

    safetensors reports an OSError inside its own SafetensorError ("… (os error 28)").
    """
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and "os error" in text:
        return text.rpartition("I/O error: ")[2] or text
    return None


def raise_write_failure(exc: BaseException, path: Path) -> None:
    """Raise a one-line SlimtuneError naming `path` when `exc` is a failed write; else return."""
    reason = write_failure(exc)
    if reason is None:
        return
    kept = "the existing one is unchanged" if os.path.lexists(path) else "nothing was written"
    raise SlimtuneError(f"cannot write {path} ({reason}); {kept}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain file is what users expect
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        raise_write_failure(exc, path)
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; swap it into place when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_umask())
    old = None
    try:
        yield tmp
        if path.exists():
            old = path.parent / f"{tmp.name}-old"
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:  # put the previous output back before anything is deleted
                os.replace(old, path)
                old = None
            raise
    except Exception as exc:
        raise_write_failure(exc, path)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_atomic_dir(out: Path, write: Callable[[Path], Any]) -> None:
    """Call write(tmp_dir), then move tmp_dir to `out` (replacing it) in one rename."""
    with atomic_dir(Path(out)) as tmp:
        write(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_yaml(path: Path, obj: dict[str, Any]) -> None:
    import yaml

    write_text_atomic(path, yaml.safe_dump(obj, sort_keys=False))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def _entries(root: Path) -> set[str]:
    """Every path under `root`, relative to it (symlinks not followed)."""
    found = set()
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        found.update(os.path.normpath(os.path.join(rel, name)) for name in dirs + files)
    return found


@contextmanager
def undone_on_failure(*paths: str | os.PathLike) -> Iterator[None]:
    """Whatever the block creates at `paths` is removed again if it fails (error or Ctrl-C).

    A path that did not exist goes whole, with the parent directories made for it; in a
    directory that existed, only the files and folders that were not there before. What
    existed stays.
    """
    before = []
    for given in paths:
        path = Path(given).expanduser().absolute()
        made = [p for p in (path, *path.parents) if not os.path.lexists(p)]
        entries = _entries(path) if path.is_dir() else None
        before.append((path, made, entries))
    try:
        yield
    except BaseException:
        for path, made, entries in before:
            if made:
                _remove(made[-1])  # the highest directory (or the file) this block made
            elif entries is not None and path.is_dir():
                for name in sorted(_entries(path) - entries, key=len):  # parents first
                    _remove(path / name)
        raise
