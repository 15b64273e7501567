"""User-facing errors: one sentence saying what is wrong and what to do.

The CLI prints `DeepSeeMoEError` messages as a single line (no traceback) and exits with 2.
"""


class DeepSeeMoEError(Exception):
    """An error caused by the user's input or environment, with its fix in the message."""
