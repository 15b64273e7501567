"""`deepseemoe graph RUN_DIR --dictionary NAME`: the sparse graph of a mapped dictionary's features and
the experts of its layer, its modules, and how significant and how expert-aligned they are."""

from __future__ import annotations

from pathlib import Path

import typer

from deepseemoe.commands._options import dictionary_name


def register(app: typer.Typer) -> None:
    @app.command()
    def graph(
        run_dir: Path = typer.Argument(..., help="The --out folder of `deepseemoe train`, after `map`."),
        dictionary: str = typer.Option(..., "--dictionary", help="Name of a mapped coder."),
        routing_run: Path = typer.Option(None, help="A routing run with statistics, to label experts with domains."),
        router_min: float = typer.Option(0.05, min=0.0, help="Router edges: least mean logit push when active."),
        lift_min: float = typer.Option(2.0, min=0.0, help="Routing edges: least lift of P(e | f) over the load."),
        count_min: int = typer.Option(5, min=1, help="Routing edges: least tokens behind the lift."),
        share_min: float = typer.Option(0.02, min=0.0, help="Composition edges: least share of the expert's output."),
        upstream: str = typer.Option(None, "--upstream", help="Another dictionary of the run at an earlier layer: "
                                     "its features join the graph, linked to this one's by the virtual weights "
                                     "of the direct residual path (decoder row · encoder column)."),
        link_min: float = typer.Option(0.1, min=0.0, help="Feature edges: least |decoder · encoder| weight."),
        fan_in: int = typer.Option(3, min=1, help="Feature edges: strongest upstream features per feature."),
        draws: int = typer.Option(10, min=2, help="Rewirings that keep the graph bipartite (degrees per edge kind kept) for the "
                                  "modularity z-score."),
        seed: int = typer.Option(0, min=0, help="Seed of Louvain, the rewirings and the layout."),
        figure: bool = typer.Option(True, "--figure/--no-figure", help="Draw the force-directed layout (PNG)."),
    ) -> None:
        """Louvain modules of the feature–expert graph, modularity against rewired graphs (z), NMI of
        modules with the features' top experts and domains; thresholds and what they kept reported."""
        from deepseemoe.errors import DeepSeeMoEError
        from deepseemoe.features.graph import Thresholds, graph_study
        from deepseemoe.progress import out_console
        from deepseemoe.runs.dictionary import DictionaryRun
        from deepseemoe.runs.routing import RoutingRun

        run = DictionaryRun.open(run_dir)
        dictionary = dictionary_name(run_dir, dictionary)
        upstream = dictionary_name(run_dir, upstream) if upstream else upstream
        if dictionary not in run.map_summaries():
            raise DeepSeeMoEError(f"{dictionary} of {run_dir} has no map yet; run `deepseemoe map {run_dir} "
                                  f"--dictionary {dictionary}` first")
        domains = RoutingRun.open(routing_run).analyses().table("domain") if routing_run else None
        thresholds = Thresholds(router_min, lift_min, count_min, share_min, link_min, fan_in)
        links = None
        if upstream is not None:
            from deepseemoe.capture.core import Site
            from deepseemoe.dictionaries.formats import load_run_dictionary
            from deepseemoe.features.graph import feature_links

            if upstream == dictionary:
                raise DeepSeeMoEError("--upstream names the dictionary itself; give one of an earlier layer")
            up, up_meta = load_run_dictionary(run_dir, upstream)
            down, down_meta = load_run_dictionary(run_dir, dictionary)
            if len(up_meta["target"]) != 1 or len(down_meta["source"]) != 1:
                raise DeepSeeMoEError("feature edges link single-site dictionaries (no crosscoders or CLTs)")
            links = feature_links(up, Site(*up_meta["target"][0]), down, Site(*down_meta["source"][0]), thresholds)
        study = graph_study(run.map_summary(dictionary), run.map_tables(dictionary), thresholds, domains, links,
                            draws=draws, seed=seed, figure=figure, name=dictionary)
        summary = {**study.summary, "upstream": upstream}
        out = run.save_graph(dictionary, study.tables, summary, study.figure)
        c = out_console()
        for k in summary["edge_kinds"]:
            c.print(f"{k['kind']} edges: kept {k['kept']:,} of {k['candidates']:,} ({100 * k['mass_share']:.1f}% of the weight)")
        line = (f"{summary['nodes']:,} nodes, {summary['edges']:,} edges → {summary['modules']} modules; modularity "
                f"{summary['modularity']:.3f} vs {summary['rewired_modularity_mean']:.3f} rewired, bipartite kept "
                f"(z = {summary['z']:.1f})")
        for key, label in (("nmi_module_top_expert", "top expert"), ("nmi_module_domain", "domain")):
            if summary[key] is not None:
                line += (f"; NMI(module; {label}) {summary[key]:.3f} vs {summary[key + '_null']:.3f} with labels "
                         f"shuffled (excess {summary[key + '_excess']:+.3f}, z = {summary[key + '_z']:.1f})")
        c.print(line)
        c.print(f"[green]→ {out}[/]")
