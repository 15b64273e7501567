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


def keep(what: str, message: str | None) -> None:
    """Record (or with None, forget) what an interruption now would leave behind, under a key."""
    if message is None:
        _kept.pop(what, None)
    else:
        _kept[what] = message


def kept_on_interrupt() -> str:
    return "; ".join(_kept.values())
