"""The `deepseemoe` command line: one typer app, each verb a thin call into the library.

Verbs live in `deepseemoe/commands/<verb>.py`; each module registers itself on `app`.
Library imports happen inside the verbs so that `deepseemoe --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

import typer

from deepseemoe import __version__

# Our bars are the only bars: transformers' "Loading weights" (on every verb that loads a model), the
# hub's and datasets' read these before their first import, which happens inside the verbs; plain tqdm
# (transformers' GGUF conversion of the offline explainer) reads TQDM_DISABLE.
for _var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
    os.environ.setdefault(_var, "1")

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


def _plain_help(command) -> None:
    """Help in the words of the usage line, not of Python's types: typer ≥ 0.2x writes `{model}` for
    a required argument, `<bool>` beside every flag and `<list[Path]>` for a repeated argument. Here:
    MODEL, nothing beside a flag, PATH... (set on each parameter of the built command tree)."""
    for param in getattr(command, "params", []):
        if getattr(param, "is_flag", False) or getattr(param, "is_bool_flag", False):
            param.display_type_rich = lambda ctx: None
        elif getattr(param, "param_type_name", "") == "argument":
            label = param.name.upper() + ("..." if param.nargs != 1 else "")
            param.metavar = label
            param._usage_display_name = lambda label=label: label
            param.display_type_rich = lambda ctx: None
        elif param.nargs != 1 or getattr(param, "multiple", False):
            bare = param.display_type_rich(None) if hasattr(param, "display_type_rich") else None
            if bare and bare.startswith("<list["):
                param.display_type_rich = lambda ctx, t=bare[6:-2]: f"<{t}>..."
    help_option = command.get_help_option

    def plain_help_option(ctx, help_option=help_option):
        option = help_option(ctx)
        if option is not None:
            option.display_type_rich = lambda ctx: None
        return option

    command.get_help_option = plain_help_option
    for sub in getattr(command, "commands", {}).values():
        _plain_help(sub)


def _fail(message: str, code: int, debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exc()
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise SystemExit(code)


def run() -> None:
    """Console entry point. Every failure is one `error:` line on stderr, never a traceback:
    bad input and environment (DeepSeeMoEError, usage errors, unwritable paths) exit 2, Ctrl-C
    exits 130 saying what was kept, anything else exits 1 as an internal error. `--debug` (or
    DEEPSEEMOE_DEBUG=1) prints the traceback as well."""
    import os
    import sys

    try:  # typer ≥ 0.24 carries its own copy of click, whose exceptions are not click's
        from typer._click import exceptions as click_exceptions
    except ImportError:
        from click import exceptions as click_exceptions

    from deepseemoe.errors import DeepSeeMoEError, ReportedByRankZero, failure_line, kept_on_interrupt

    args = sys.argv[1:]
    debug = "--debug" in args or os.environ.get("DEEPSEEMOE_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        command = typer.main.get_command(app)
        _plain_help(command)
        code = command.main(args=args, prog_name="deepseemoe", standalone_mode=False)
    except ReportedByRankZero:
        raise SystemExit(2) from None
    except DeepSeeMoEError as exc:
        _fail(str(exc), 2, debug)
    except (KeyboardInterrupt, *[getattr(click_exceptions, "Abort", KeyboardInterrupt)]):
        kept = kept_on_interrupt()
        _fail("interrupted; " + (kept or "nothing half-written was left"), 130, debug)
    except getattr(click_exceptions, "NoArgsIsHelpError", ()) as exc:  # `deepseemoe` alone: its help
        exc.show()
        raise SystemExit(0) from None
    except click_exceptions.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "deepseemoe"
        _fail(f"{exc.format_message()} (see `{command} --help`)", 2, debug)
    except click_exceptions.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code, debug)
    except Exception as exc:  # an unwritable path or full disk (exit 2), or a bug (exit 1): still one line
        _fail(*failure_line(exc), debug)
    if code == 130:  # typer turns Ctrl-C inside a command into exit code 130
        kept = kept_on_interrupt()
        _fail("interrupted; " + (kept or "nothing half-written was left"), 130, False)
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
