"""Where a command writes, checked before any work: a bad output path is one line within a second,
and no file of the user's is replaced.

A destination is refused when it is a folder where a file is wanted, the very file being read,
an existing file (unless the user asked for it with `--force`), or in a place nothing can be
written (read-only, not a folder). Imports nothing heavy: the CLI calls it before torch.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omni_cli.errors import ConfigError


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (where a missing folder would be created)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unwritable_reason(folder: Path) -> str | None:
    """Why files cannot be written in `folder` (created first when missing, so its nearest existing
    ancestor is what counts); None when they can."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    # access() answers for the read-only file systems and permissions that bind this process (root included: EROFS).
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        return f"{existing} is on a read-only file system" if read_only else f"{existing} is not writable"
    return None


def same_file(a: Path, b: Path) -> bool:
    """True when `a` and `b` name the same file (through links or different spellings)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


def check_new_file(dst: Path, name: str, *, sources: Sequence[Path] = (), force: bool = False) -> None:
    """Refuse `dst` (shown as `name`, e.g. "--out x.jsonl") as a file to write, before any work.

    Refused: a folder; one of `sources` (the files being read), an existing file, unless `force`;
    a place where nothing can be written. Raises ConfigError with one line saying what to do.
    """
    if dst.is_dir():
        raise ConfigError(f"{name} is a folder; give the name of a file to write.")
    if dst.exists() and not force and any(same_file(dst, source) for source in sources):
        raise ConfigError(f"{name} is the file being read; write to another file, or add --force to replace it.")
    if dst.exists() and not force:
        raise ConfigError(f"{name} already exists; give a new file name, or add --force to replace it.")
    reason = unwritable_reason(dst.parent)
    if reason is not None:
        raise ConfigError(f"cannot write {name}: {reason}; choose a writable place.")


def check_new_folder(dst: Path, name: str) -> None:
    """Refuse `dst` (shown as `name`) as a new folder to write, before any work: an existing file, a
    folder that is not empty, or a place where nothing can be written. Raises ConfigError."""
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"{name} is a file; give the name of a new folder.")
    if dst.is_dir() and any(dst.iterdir()):
        raise ConfigError(f"{name} already exists and is not empty; give a new folder.")
    reason = unwritable_reason(dst)
    if reason is not None:
        raise ConfigError(f"cannot write {name}: {reason}; choose a writable place.")


def check_input_file(path: Path, what: str, hint: str) -> None:
    """Refuse an input that is missing or a folder, before any work: "{what} {path} not found; {hint}." """
    if not path.exists():
        raise ConfigError(f"{what} {path} not found; {hint}.")
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder, not a file; {hint}.")


def check_writable_folder(folder: Path, option: str, what: str) -> None:
    """Refuse `folder` (given as `option`, e.g. "--out") as a folder for `what`, before any work: a file,
    a path under a file, or a place where no file can be made (read-only, /proc). Raises ConfigError.

    A file is really made and removed, so what access() cannot tell (pseudo file systems, root on a
    read-only mount) is caught too. `omni finetune --output`, `omni data build --out` and `omni eval --out` share it.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option} {folder} is a file; give a folder for {what}.")
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise ConfigError(f"{option} {folder} cannot be created: {existing} is a file, not a folder; choose another {option}.")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".omni-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{option} {folder} is not writable ({exc.strerror or type(exc).__name__} in {existing}); choose a folder you can write to."
        ) from None
