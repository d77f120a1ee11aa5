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
    marker = folder / "key.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == json.loads(json.dumps(key, sort_keys=True, default=str)):
                return load(folder)
            log.warning("cache %s: key mismatch, rebuilding", folder)
        except Exception as error:  # a damaged entry is rebuilt below
            log.warning("cache %s is unusable (%s), rebuilding", folder, str(error).splitlines()[0] if str(error) else error)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        build(staging)
        (staging / "key.json").write_text(json.dumps(key, sort_keys=True, default=str))  # written last: marks complete
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load(folder)
