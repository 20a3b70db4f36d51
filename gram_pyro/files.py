"""Files written whole: under a temporary name beside the target, then renamed into place, so that a
crash leaves the old file or the new one, never half of one. The temporary file gets the permissions
of any file the user creates (``0666`` less the umask, so ``0644`` under the usual ``022``), not
:func:`tempfile.mkstemp`'s private ``0600``: caches and checkpoints stay readable by whoever may read
the directory they are in.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Callable


@functools.cache
def umask() -> int:
    """This process's umask (read once: reading it means setting it, for a moment)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_beside(path: Path) -> Path:
    """A new, empty file beside ``path`` with a name no other writer has, mode ``0666`` less the umask."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~umask())
    finally:
        os.close(handle)
    return Path(name)


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary)`` on a :func:`temporary_beside` file, then rename it to ``path``; the
    temporary file is removed whatever happens."""
    temporary = temporary_beside(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
