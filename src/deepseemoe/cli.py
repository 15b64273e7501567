"""The `deepseemoe` command line: one typer app, each verb a thin call into the library.

Verbs live in `deepseemoe/commands/<verb>.py`; each module registers itself on `app`.
Library imports happen inside the verbs so that `deepseemoe --help` stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

from deepseemoe import __version__

app = typer.Typer(
    name="deepseemoe",
    help="See inside Mixture-of-Experts language models: which expert is active when and where.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"deepseemoe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """DeepSeeMoE command line."""


def _register_commands() -> None:
    import deepseemoe.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):  # helpers shared by the verbs, not verbs
            continue
        module = importlib.import_module(f"deepseemoe.commands.{info.name}")
        module.register(app)


_register_commands()


def run() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    from deepseemoe.errors import DeepSeeMoEError

    try:
        app(standalone_mode=True)
    except DeepSeeMoEError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise SystemExit(2) from None


if __name__ == "__main__":
    run()
