"""Errors the user can fix, and how the console scripts report them.

A *user error* is caused by the input, not by a bug: a bad config value or key, a malformed record,
a budget the pool cannot satisfy, a missing file. The console scripts print it as its message alone
and exit with status 1: ``grads`` and ``grads-select`` through Hydra's own error handler
(:func:`hydra_reported`), ``grads-cache`` and ``grads-report`` as ``<prog>: error: <message>``
(:func:`reported`). Its traceback is one switch away: ``HYDRA_FULL_ERROR=1`` for every script, or
``-v`` / ``--verbose`` for the argparse ones. Any other exception keeps its traceback.

The user errors are :class:`UserError` (the modules' own error classes derive from it, e.g.
``grads.config.ConfigError``, ``grads.data.readers.BadRecordError``, ``grads.selectors.budget.BudgetError``;
they remain ``ValueError`` subclasses) and the standard library's missing-file errors
(:data:`USER_ERRORS`). This module imports nothing from ``grads``, so every module can import it,
and nothing heavy (Hydra only when a user error is reported).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

FULL_ERROR_ENV = "HYDRA_FULL_ERROR"


class UserError(Exception):
    """An error in the input (config, data, files), reported as its message without a traceback.

    Subclasses name what was wrong and where (config key, file, row, field) in the message.
    """


# What the console scripts report as a message: the project's own user errors, and a missing file
# or folder (the message names the path).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NotADirectoryError)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a user error (:data:`USER_ERRORS`)."""
    return isinstance(exc, USER_ERRORS)


def full_error_requested() -> bool:
    """``HYDRA_FULL_ERROR`` is set to something other than ``0``/empty (Hydra reads it the same way)."""
    return os.environ.get(FULL_ERROR_ENV, "") not in ("", "0")


def message(exc: BaseException) -> str:
    """The text shown for a user error: its message, or for an ``OSError`` the path and reason."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def hydra_reported() -> Iterator[None]:
    """Hand a user error raised inside to Hydra's error handler as a compact exception.

    For ``@hydra.main`` apps: Hydra prints a ``CompactHydraException`` as its message alone
    (after the failing job's overrides and before its ``HYDRA_FULL_ERROR=1`` hint) and exits with
    status 1, in single runs and sweeps alike. With ``HYDRA_FULL_ERROR=1`` the original exception
    propagates and Hydra shows its full traceback; other exceptions always propagate.
    """
    try:
        yield
    except Exception as exc:
        if not is_user_error(exc) or full_error_requested():
            raise
        from hydra.errors import CompactHydraException

        raise CompactHydraException(message(exc)) from exc


@contextlib.contextmanager
def reported(prog: str, verbose: bool = False) -> Iterator[None]:
    """Turn a user error raised inside into one ``<prog>: error: <message>`` line and exit status 1.

    For argparse entry points. ``verbose`` (their ``-v``) or ``HYDRA_FULL_ERROR=1`` lets the error
    propagate with its traceback; other exceptions always propagate.
    """
    try:
        yield
    except Exception as exc:
        if not is_user_error(exc) or verbose or full_error_requested():
            raise
        print(f"{prog}: error: {message(exc)}", file=sys.stderr)
        print(f"(-v or {FULL_ERROR_ENV}=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None
