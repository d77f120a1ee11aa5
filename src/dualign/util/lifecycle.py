"""How a job ends: a SIGTERM becomes a non-zero exit (128 + 15, as a shell reports it) and a KILLED MLflow run, an
error a FAILED run with the error as a tag, and only a job that finished its files a FINISHED run.

Lightning ends the MLflow run when `fit` returns, before the one-shot comparison, the evaluation and the artifacts;
`JobLogger` leaves that to the job. Lightning turns SIGTERM during `fit` into `SIGTERMException`, a bare SystemExit
(exit status 0: schedulers would count the job as completed); outside `fit` SIGTERM would kill the process with no
cleanup. `terminations()` handles both."""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("dualign")


class Terminated(BaseException):
    """The job was asked to stop (SIGTERM). BaseException, like KeyboardInterrupt: no `except Exception` swallows it."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


class JobLogger(MLFlowLogger):
    """MLFlowLogger whose run is ended by the job (`end`), not by Lightning when a fit ends, and whose tracking
    trouble never costs the run: a failed call is retried with back-off, then reported in one line and tracking
    stops for the rest of the job (the run's files are written locally either way)."""

    RETRIES = (1.0, 4.0, 16.0)  # seconds between attempts
    disabled = False

    def finalize(self, status: str = "success") -> None:  # Lightning calls this at the end of every fit
        pass

    def _guarded(self, what: str, call) -> None:
        if self.disabled:
            return
        for attempt, pause in enumerate((*self.RETRIES, None)):
            try:
                call()
                return
            except Exception as problem:
                if pause is None:
                    self.disabled = True
                    log.warning("MLflow: %s failed %d times (%s); tracking stops for this job, results are in the run "
                                "folder", what, attempt + 1, str(problem).strip().splitlines()[0][:200])
                    return
                time.sleep(pause)

    def log_metrics(self, metrics, step=None) -> None:
        self._guarded("logging metrics", lambda: super(JobLogger, self).log_metrics(metrics, step))

    def log_hyperparams(self, params) -> None:
        self._guarded("logging parameters", lambda: super(JobLogger, self).log_hyperparams(params))

    def log_artifact(self, path) -> None:
        self._guarded(f"logging {Path(path).name}", lambda: self.experiment.log_artifact(self.run_id, str(path)))

    def set_tag(self, key: str, value: str) -> None:
        self._guarded(f"tagging {key}", lambda: self.experiment.set_tag(self.run_id, key, value))

    def log_table(self, data: dict, artifact_file: str) -> None:
        self._guarded(f"logging {artifact_file}",
                      lambda: self.experiment.log_table(self.run_id, data=data, artifact_file=artifact_file))

    def end(self, status: str, error: str | None = None) -> None:
        if self.disabled:
            return
        try:
            if error:
                self.experiment.set_tag(self.run_id, "error", error[:4000])
            self.experiment.set_terminated(self.run_id, status)
        except Exception as problem:  # tracking trouble never costs the run's results, which are on disk already
            log.warning("MLflow: could not mark run %s %s (%s)", self.run_id, status, str(problem).splitlines()[0])


SQLITE_HEADER = b"SQLite format 3\x00"


def sqlite_path(uri: str) -> Path:
    """The database file of a sqlite:/// URI (query options such as ?timeout= left out)."""
    return Path(uri[len("sqlite:///"):].split("?", 1)[0]).expanduser().resolve()


def is_sqlite_file(path: Path) -> bool:
    """An empty file or one that starts with SQLite's header (16 bytes read, not the whole store)."""
    with open(path, "rb") as stream:
        head = stream.read(16)
    return not head or head == SQLITE_HEADER


def prepare_sqlite_store(uri: str) -> str:
    """A sqlite store created (or migrated) by one process at a time, under a file lock: two first runs on a fresh
    store raced in MLflow's schema migration ("duplicate column name"). The returned URI waits up to 60 s for a
    write lock instead of sqlite's 5 s."""
    import mlflow
    from filelock import FileLock

    path = sqlite_path(uri)
    with FileLock(f"{path}.lock", timeout=600):
        mlflow.MlflowClient(uri).search_experiments(max_results=1)  # creates or migrates the schema
    return uri if "timeout=" in uri else f"{uri}{'&' if '?' in uri else '?'}timeout=60"


_in_fit = threading.Event()


def _on_sigterm(signum, frame):
    if _in_fit.is_set():  # Lightning's handler stops fit at the next batch boundary, on every rank together
        return
    raise Terminated(signum)


@contextlib.contextmanager
def fitting():
    """Around trainer.fit: SIGTERM is Lightning's to handle (it raises SIGTERMException, mapped to Terminated)."""
    _in_fit.set()
    try:
        yield
    except SIGTERMException:
        raise Terminated(signal.SIGTERM) from None
    finally:
        _in_fit.clear()


@contextlib.contextmanager
def terminations(logger: JobLogger | None):
    """The whole job: SIGTERM raises Terminated; the MLflow run ends with the job's outcome."""
    previous = signal.getsignal(signal.SIGTERM)
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except Terminated:
        if logger is not None:
            logger.end("KILLED", "stopped by SIGTERM")
        raise
    except BaseException as error:
        if logger is not None:
            logger.end("FAILED", f"{type(error).__name__}: {error}")
        raise
    else:
        if logger is not None:
            logger.end("FINISHED")
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
