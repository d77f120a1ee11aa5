"""How a job ends: a SIGTERM becomes a non-zero exit (128 + 15, as a shell reports it) and a KILLED MLflow run, an
error a FAILED run with the error as a tag, and only a job that finished its files a FINISHED run (the job ends the
run, not Lightning: tracking/mlflow.py). Lightning turns SIGTERM during `fit` into `SIGTERMException`, a bare
SystemExit (exit status 0: schedulers would count the job as completed); outside `fit` SIGTERM would kill the
process with no cleanup. `terminations()` handles both."""
from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(BaseException):
    """The job was asked to stop (SIGTERM). BaseException, like KeyboardInterrupt: no `except Exception` swallows it."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


_in_fit = threading.Event()


def _on_sigterm(signum, frame):
    if _in_fit.is_set():  # Lightning's handler stops fit at the next batch boundary, on every rank together
        return
    raise Terminated(signum)


@contextlib.contextmanager
def fitting():
    """Around trainer.fit: SIGTERM is Lightning's to handle (it raises SIGTERMException, mapped to Terminated)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException  # here: the command line needs no torch

    _in_fit.set()
    try:
        yield
    except SIGTERMException:
        raise Terminated(signal.SIGTERM) from None
    finally:
        _in_fit.clear()


@contextlib.contextmanager
def terminations(logger):
    """The whole job: SIGTERM raises Terminated; the tracking run (anything with `end(status, error)`, e.g.
    tracking.mlflow.JobLogger) ends with the job's outcome."""
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
