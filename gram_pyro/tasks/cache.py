"""Build a data set once, keep it in a cache directory, rebuild when the config changes or the file
is damaged.

``cached(name, params, version, build, cache_dir)`` returns the arrays that ``build()`` makes. The
cache entry is two files named by a hash of ``(name, version, params)``:

* ``<name>-<hash>.npz``: the arrays (``numpy.savez``; no pickles);
* ``<name>-<hash>.json``: metadata ``{"name", "version", "params", "arrays", "meta"}`` where
  ``arrays`` lists the array names and ``meta`` is whatever ``build`` returned beside the arrays
  (vocab, seq_len, counts, seed ...).

A changed config or generator version is a different hash and so a new build. A file that cannot be
read, or whose metadata names another task, version or parameters (a foreign file), is reported on one
line on stderr and rebuilt; it is never silently reused and never crashes the run. Each file is
written whole (:func:`gram_pyro.files.write_whole`: a temporary name, then a rename), the arrays before
the metadata, so an interrupted build leaves no half-written file and at most arrays without their
metadata, which the next read reports and rebuilds; they are readable by all who may read the cache
directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from gram_pyro.files import write_whole

DEFAULT_CACHE_DIR = "~/.cache/gram-pyro"
"""Used when a task's ``cache_dir`` is empty; ``GRAM_PYRO_CACHE`` overrides it."""

Arrays = dict[str, np.ndarray]


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """The cache directory: ``cache_dir``, else ``$GRAM_PYRO_CACHE``, else :data:`DEFAULT_CACHE_DIR`."""
    return Path(cache_dir or os.environ.get("GRAM_PYRO_CACHE") or DEFAULT_CACHE_DIR).expanduser()


def cache_key(name: str, params: dict, version: int) -> str:
    text = json.dumps({"name": name, "version": version, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read(npz: Path, meta_file: Path, name: str, params: dict, version: int) -> tuple[Arrays, dict]:
    """Load an entry or raise ``ValueError`` saying what is wrong with it."""
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"unreadable metadata ({type(error).__name__})") from None
    expected = json.loads(json.dumps({"name": name, "version": version, "params": params}, default=str))
    if not isinstance(meta, dict) or {k: meta.get(k) for k in expected} != expected:
        raise ValueError("metadata belongs to another task, version or config")
    try:
        with np.load(npz, allow_pickle=False) as data:
            arrays = {key: data[key] for key in meta["arrays"]}
    except Exception as error:  # any failure to read the archive means a damaged file
        raise ValueError(f"unreadable arrays ({type(error).__name__})") from None
    return arrays, meta["meta"]


def _write(npz: Path, meta_file: Path, arrays: Arrays, record: dict) -> None:
    """Write the arrays, then the metadata, each under a temporary name of this call's own renamed into
    place (:func:`gram_pyro.files.write_whole`): processes that build the same entry at once (parallel
    runs on a fresh machine) each rename a whole file."""
    npz.parent.mkdir(parents=True, exist_ok=True)

    def save_arrays(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)

    write_whole(npz, save_arrays)
    write_whole(meta_file, lambda temporary: temporary.write_text(json.dumps(record, indent=1, sort_keys=True,
                                                                             default=str)))


def cached(name: str, params: dict, version: int, build: Callable[[], tuple[Arrays, dict]],
           cache_dir: str | os.PathLike | None = None) -> tuple[Arrays, dict]:
    """``(arrays, meta)`` from the cache entry of ``(name, version, params)``, building it with
    ``build() -> (arrays, meta)`` when it is missing or damaged."""
    root = cache_root(cache_dir)
    stem = f"{name}-{cache_key(name, params, version)}"
    npz, meta_file = root / f"{stem}.npz", root / f"{stem}.json"
    if npz.exists() or meta_file.exists():
        try:
            return _read(npz, meta_file, name, params, version)
        except ValueError as problem:
            print(f"gram-pyro: cache {npz} is damaged or foreign ({problem}); rebuilding", file=sys.stderr)
    arrays, meta = build()
    record = {"name": name, "version": version, "params": params, "arrays": sorted(arrays), "meta": meta}
    try:
        _write(npz, meta_file, arrays, record)
    except OSError as error:
        print(f"gram-pyro: cannot write cache {npz} ({error.strerror}); continuing without it", file=sys.stderr)
    return arrays, meta


def progress(iterable=None, desc: str = "", total: int | None = None):
    """A progress bar for a long loop (tqdm on stderr, removed when done; off where
    ``GRAM_PYRO_QUIET=1``)."""
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                disable=os.environ.get("GRAM_PYRO_QUIET") == "1")
