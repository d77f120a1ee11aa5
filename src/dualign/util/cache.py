"""On-disk caches keyed by a hash of what produced them, written atomically (a temporary folder, then one rename)
and validated on load: a cache that is incomplete, unreadable, altered since it was written (its files' SHA-256 are
recorded in manifest.json) or made for another key is rebuilt, never used. Staging folders of attempts that were
killed (`.tmp-<host>-<pid>-*` whose process is gone) are removed by the next attempt."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
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
    _remove_abandoned_staging(folder.parent)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{socket.gethostname()}-{os.getpid()}-"))
    try:
        build(staging)
        manifest = {str(p.relative_to(staging)): file_sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        (staging / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
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
        manifest = json.loads((folder / "manifest.json").read_text())
        for name, digest in manifest.items():
            if file_sha256(folder / name) != digest:
                raise ValueError(f"{name} changed since it was written (SHA-256 mismatch)")
        return load(folder)
    except Exception as error:  # a damaged entry is rebuilt
        if not quiet:
            log.warning("cache %s is unusable (%s), rebuilding", folder, str(error).splitlines()[0] if str(error) else error)
        return _MISSING


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_abandoned_staging(parent: Path) -> None:
    """Staging folders this host's killed processes left behind (another host's are left to it)."""
    host = socket.gethostname()
    for staging in parent.glob(f".tmp-{host}-*"):
        try:
            pid = int(staging.name[len(f".tmp-{host}-"):].split("-", 1)[0])
            os.kill(pid, 0)  # raises when no such process
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except (ValueError, PermissionError):
            pass
