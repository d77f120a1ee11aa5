"""On-disk caches keyed by a hash of what produced them, written atomically (a temporary folder, then one rename)
and validated on load: a cache that is incomplete, unreadable or made for another key is rebuilt, never used."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

log = logging.getLogger("dualign")
T = TypeVar("T")


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_folder(root: str | os.PathLike, kind: str, key: dict, build: Callable[[Path], None],
                  load: Callable[[Path], T]) -> T:
    """load(folder) of the cache entry for `key`; build(staging_folder) writes it first when it is missing or bad.
    `load` raises (any exception) when what it finds is not valid."""
    folder = Path(root) / kind / key_hash(key)
    expected = json.loads(json.dumps(key, sort_keys=True, default=str))
    found = _valid(folder, expected, load)
    if found is not _MISSING:
        return found
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        build(staging)
        (staging / "key.json").write_text(json.dumps(key, sort_keys=True, default=str))  # written last: marks complete
        # another process (a parallel sweep job, another rank) may have finished the same entry meanwhile: keep it
        found = _valid(folder, expected, load, quiet=True)
        if found is not _MISSING:
            return found
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete or damaged entry
        try:
            os.replace(staging, folder)
        except OSError:  # a complete entry appeared between the check and the rename
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load(folder)


_MISSING = object()


def _valid(folder: Path, expected, load, quiet: bool = False):
    """load(folder) when it holds a complete entry for this key, else _MISSING."""
    marker = folder / "key.json"
    if not marker.is_file():
        return _MISSING
    try:
        if json.loads(marker.read_text()) != expected:
            if not quiet:
                log.warning("cache %s: key mismatch, rebuilding", folder)
            return _MISSING
        return load(folder)
    except Exception as error:  # a damaged entry is rebuilt
        if not quiet:
            log.warning("cache %s is unusable (%s), rebuilding", folder, str(error).splitlines()[0] if str(error) else error)
        return _MISSING
