"""Checks run before anything heavy is imported or built: a run that could not save its results (an output or cache
folder that cannot be written, an MLflow store that cannot be reached or is not a database) fails in one line, in
about a second. Standard library only: the CLI runs these before it imports torch, Lightning and MLflow."""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from dualign.errors import ConfigError


def preflight(cfg) -> None:
    """The validated config's output and cache folders writable, and (on the launching process) its MLflow store."""
    for key, folder in (("paths.output_dir", cfg.paths.output_dir), ("paths.cache_dir", cfg.paths.cache_dir)):
        path = Path(folder)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise ConfigError(f"{key}={folder!r} is not writable ({error.strerror or error})") from None
    # only rank 0 tracks; before trainer.fit there is no process group, so the launcher's RANK says which process this is
    if cfg.logger.enabled and int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0:
        check_store(cfg.logger.tracking_uri)


SQLITE_HEADER = b"SQLite format 3\x00"


def sqlite_path(uri: str) -> Path:
    """The database file of a sqlite:/// URI (query options such as ?timeout= left out)."""
    return Path(uri[len("sqlite:///"):].split("?", 1)[0]).expanduser().resolve()


def is_sqlite_file(path: Path) -> bool:
    """An empty file or one that starts with SQLite's header (16 bytes read, not the whole store)."""
    with open(path, "rb") as stream:
        head = stream.read(16)
    return not head or head == SQLITE_HEADER


def check_store(uri: str) -> None:
    """Before anything is built: a server that answers, or a sqlite file that is one in a writable folder."""
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).read()
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ConfigError(f"logger.tracking_uri={uri!r} is not reachable ({reason}); start the server or set "
                              "logger.enabled=false") from None
    elif uri.startswith("sqlite:///"):
        database = sqlite_path(uri)
        if database.is_file() and not is_sqlite_file(database):
            raise ConfigError(f"logger.tracking_uri={uri!r}: {database} is not an SQLite database")
        folder = database.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"logger.tracking_uri={uri!r}: cannot create {folder} ({error.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"logger.tracking_uri={uri!r}: {folder} is not writable")
    elif uri.startswith("file:") or "://" not in uri:
        raise ConfigError(f"logger.tracking_uri={uri!r}: MLflow 3 needs a database or server store, "
                          "e.g. sqlite:///outputs/mlflow.db or http://host:5000")
