"""User-facing errors: one sentence saying what is wrong and what to do.

The CLI prints `DeepSeeMoEError` messages as a single line (no traceback) and exits with 2.
Long-running work says what it has kept so far (`keep`), so that Ctrl-C can tell the user.
"""

from __future__ import annotations

_kept: dict[str, str] = {}


class DeepSeeMoEError(Exception):
    """An error caused by the user's input or environment, with its fix in the message."""


class RankLost(DeepSeeMoEError):
    """Under torchrun, a collective broke because another rank's process ended (killed, out of
    memory, its machine lost): what this rank has finished is kept for a resume, not cleaned up."""


class ReportedByRankZero(DeepSeeMoEError):
    """Under torchrun, a failure rank 0 prints for the whole run: the other ranks exit with the same
    code and print nothing, so the user reads one `error:` line, not one per process."""


def failure_line(exc: BaseException) -> tuple[str, int]:
    """The one line and the exit code the CLI gives an exception: the user's input or environment
    (DeepSeeMoEError; unwritable or missing paths, a full disk) exit 2, anything else is a bug (1).
    Under torchrun rank 0 prints the line another rank met, so both use this one wording."""
    if isinstance(exc, DeepSeeMoEError):
        return str(exc), 2
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot use{where}: {exc.strerror or exc}; check the path, its permissions and the free space", 2
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return (f"internal error ({type(exc).__name__}: {first}); rerun with --debug for the traceback and "
            "please report it"), 1


def keep(what: str, message: str | None) -> None:
    """Record (or with None, forget) what an interruption now would leave behind, under a key."""
    if message is None:
        _kept.pop(what, None)
    else:
        _kept[what] = message


def kept_on_interrupt() -> str:
    return "; ".join(_kept.values())
