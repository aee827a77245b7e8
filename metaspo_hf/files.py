"""Files written atomically (temp file, fsync, rename) and JSON read with errors that name the file.

A shared utility: the run folder, the protocols and the report all write through it.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import MetaspoError

# Suffix of the temporary files behind atomic writes; a kill can leave one, removed on resume.
TEMP_SUFFIX = ".tmp"



@contextmanager
def atomic_file(path: str | Path, binary: bool = False) -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On an exception (or a kill) ``path`` keeps its previous content and the temporary file is removed
    (a kill can leave one ``.<name>.<random>.tmp`` behind; ``RunDir.open`` removes those).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
    # Mode 0o666 minus the umask, as open() would give (mkstemp's 0600 would hide results from others).
    handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        # newline="" writes "\n" as is on every platform, so CSV and JSON files are byte-identical.
        with (
            os.fdopen(handle, "wb") if binary else os.fdopen(handle, "w", encoding="utf-8", newline="")
        ) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the folder entry is on disk (POSIX; Windows has no dir fds).
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (temp file, fsync, rename)."""
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_file(path) as fh:
        fh.write(text)
    return Path(path)


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``; a missing or malformed file is a MetaspoError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MetaspoError(f"{path} does not exist") from None
    except json.JSONDecodeError as error:
        raise MetaspoError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from None
