"""Options shared by several verbs, so that each means the same everywhere."""

from __future__ import annotations

import typer

TRUST_REMOTE_CODE_HELP = ("Run the model repository's own Python code (only if you trust it). Only this flag "
                          "grants it: a run's saved config may record it, never grant it.")


def trust_remote_code_option():
    return typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP)
