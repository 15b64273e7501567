"""`deepseemoe explain` and `deepseemoe score`: LLM descriptions of features and experts, and how far
each can be trusted (README: Explanations)."""

from __future__ import annotations

from pathlib import Path

import typer

from deepseemoe.commands._options import chat_backend_options, dictionary_name, trust_remote_code_option


def _target(run_dir: Path, dictionary: str | None, layer: int | None):
    from deepseemoe.errors import DeepSeeMoEError
    from deepseemoe.runs.explanations import ExplanationStore

    if (dictionary is None) == (layer is None):
        raise DeepSeeMoEError("say what to explain: --dictionary NAME (features of a training run) or --layer L "
                              "(the experts of one layer of a routing run)")
    if dictionary is not None:
        dictionary = dictionary_name(run_dir, dictionary)
        return ExplanationStore.for_features(run_dir, dictionary)
    return ExplanationStore.for_experts(run_dir, layer)


def _parse_features(text: str) -> int | list[int]:
    """"20": the first 20 that fire often enough; "3,17,42" (or "17,"): those features."""
    from deepseemoe.errors import DeepSeeMoEError

    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) == 1:
            n = int(parts[0])
            if n < 1:
                raise ValueError
            return n
        ids = [int(p) for p in parts if p]
        if not ids or min(ids) < 0:
            raise ValueError
        return ids
    except ValueError:
        raise DeepSeeMoEError(f"--features {text!r}: give a count (20) or feature ids (3,17,42; one: 17,)") from None


def register(app: typer.Typer) -> None:
    opts = chat_backend_options()

    @app.command()
    def explain(
        run_dir: Path = typer.Argument(..., help="A training run (with --dictionary) or a routing run (with --layer)."),
        dictionary: str = typer.Option(None, help="Explain features of this dictionary."),
        layer: int = typer.Option(None, min=0, help="Explain the experts of this MoE layer of a routing run."),
        features: str = typer.Option("20", help="Features: how many (the first that fire often enough), e.g. 20, "
                                                "or which, e.g. 3,17,42 (one feature: 17,)."),
        data: str = typer.Option(None, help="Text for the features' examples (default: the run's)."),
        tokens: int = typer.Option(20_000, min=1, help="Tokens to draw the features' examples from."),
        window: int = typer.Option(24, min=4, help="Tokens per example."),
        prompts: Path = typer.Option(None, help="A folder with your own prompt templates (same file names as "
                                                "deepseemoe/explain/prompts)."),
        find: str = typer.Option(None, help="Instead: list the explained units whose description holds these words."),
        device: str = typer.Option(None, help="Device for the model and the coder (features)."),
        backend: str = opts["backend"], url: str = opts["url"], model: str = opts["model"],
        api_key_env: str = opts["api_key_env"], concurrency: int = opts["concurrency"],
        rate_limit: float = opts["rate_limit"], cache: Path = opts["cache"],
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Describe features or experts with an LLM (delphi-style prompts with MoE context)."""
        from deepseemoe.explain.backends import chat_backend
        from deepseemoe.explain.explainer import Prompts
        from deepseemoe.explain.pipeline import expert_source, feature_source, find_descriptions, run_explain
        from deepseemoe.progress import out_console

        console = out_console()
        if find is not None:
            found, searched, modules = find_descriptions(run_dir, find.lower().split())
            for name, unit, text in found:
                console.print(f"{name} {unit}: {text}", soft_wrap=True)
            if not found:
                console.print(f"no description in {run_dir} holds {find!r} ({searched} descriptions of "
                              f"{modules} explained module(s) searched)", soft_wrap=True)
            return
        store = _target(run_dir, dictionary, layer)
        template = Prompts.load(prompts)
        chosen = _parse_features(features)
        # the backend first: a bad --url, key or missing package is refused before the long work
        chat = chat_backend(backend, url, model, api_key_env, concurrency, rate_limit, cache, trust_remote_code)
        if dictionary is not None:
            corpus, acts, units, contexts = feature_source(run_dir, dictionary, data=data, tokens=tokens,
                                                           features=chosen, device=device,
                                                           trust_remote_code=trust_remote_code)
            source = {"run": str(run_dir), "dictionary": dictionary, "data": data, "tokens": tokens}
            kind = "feature"
        else:
            corpus, acts, units, contexts = expert_source(run_dir, layer)
            source = {"run": str(run_dir), "layer": layer}
            kind = "expert"
        got = run_explain(store, corpus, acts, units, contexts, chat, template, kind=kind, source=source,
                          window=window, routing=kind == "expert")
        for unit, text in got.items():
            console.print(f"[bold]{kind} {unit}[/]: {text}")
        console.print(f"[green]{len(got)} explanations → {store.path}[/] (answers: {chat.hits} cached, "
                      f"{chat.misses} new)")

    @app.command()
    def score(
        run_dir: Path = typer.Argument(..., help="The run `deepseemoe explain` wrote to."),
        dictionary: str = typer.Option(None, help="Score the explanations of this dictionary's features."),
        layer: int = typer.Option(None, min=0, help="Score the explanations of this layer's experts."),
        scorers: str = typer.Option(None, help="detection, fuzz, routing (default: detection,fuzz for features; "
                                               "routing,detection for experts)."),
        per_prompt: int = typer.Option(None, min=1, hidden=True,
                                       help="Deprecated: each example is now judged on its own prompt."),
        prompts: Path = typer.Option(None, help="A folder with your own prompt templates."),
        backend: str = opts["backend"], url: str = opts["url"], model: str = opts["model"],
        api_key_env: str = opts["api_key_env"], concurrency: int = opts["concurrency"],
        rate_limit: float = opts["rate_limit"], cache: Path = opts["cache"],
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Detection, fuzzing and routing prediction of the explanations, beside shuffled-explanation
        and token-identity baselines."""
        from deepseemoe.errors import DeepSeeMoEError
        from deepseemoe.explain.backends import chat_backend
        from deepseemoe.explain.explainer import Prompts
        from deepseemoe.explain.pipeline import run_score
        from deepseemoe.explain.scorers import SCORERS
        from deepseemoe.progress import out_console
        from deepseemoe.report import terminal

        if per_prompt is not None:
            typer.echo("warning: --per-prompt is ignored: each example is now judged on its own prompt "
                       "(CHANGELOG.md)", err=True)
        store = _target(run_dir, dictionary, layer)
        names = scorers.split(",") if scorers else (["detection", "fuzz"] if dictionary else ["routing", "detection"])
        bad = [s for s in names if s not in SCORERS]
        if bad:
            raise DeepSeeMoEError(f"unknown scorer(s) {bad}; choose from {', '.join(SCORERS)}")
        template = Prompts.load(prompts)
        store.examples()  # refuses before loading a model when nothing was explained
        chat = chat_backend(backend, url, model, api_key_env, concurrency, rate_limit, cache, trust_remote_code)
        summary = run_score(store, chat, template, names)
        console = out_console()
        for line in terminal.scores(summary):
            console.print(line)
        asked = f" (answers: {chat.hits} cached, {chat.misses} new)" if hasattr(chat, "hits") else ""
        console.print(f"[green]→ {store.path}[/]{asked}")
