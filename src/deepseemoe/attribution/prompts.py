"""One prompt → one pruned attribution graph, its circuit-tracer JSON and its sentence: what the
`attribute` verb and the demo both do, written once.

Prompts are text: a BOS token goes in front (when the tokenizer has one), as the model saw its
training documents. The demo's prompts are the openings of held-out documents, one per domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from deepseemoe.attribution.export import graph_json, perturbation_sentence, route_sentence, strongest_route
from deepseemoe.attribution.graph import AttributionGraph, build_graph, prune
from deepseemoe.attribution.perturb import routing_perturbation
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.handle import ModelHandle


@dataclass
class PromptGraph:
    label: str  # the prompt's name (the demo: its domain)
    prompt: str
    graph: AttributionGraph  # pruned
    doc: dict  # circuit-tracer's graph JSON of the kept part
    route: dict | None  # strongest_route
    sentence: str
    # at each layer a dictionary explains: its strongest routing decision and the sentence, when one was kept
    dictionary_routes: dict[int, tuple[dict, str]]

    def index_entry(self) -> dict:
        """What the study's attribution.json says of this graph (runs/study.py adds its file)."""
        t = self.graph.nodes[self.graph.target]
        return {"label": self.label, "prompt": self.prompt, "tokens": len(self.graph.tokens),
                "target": t.extra.get("token", ""), "target_probability": t.extra.get("probability"),
                "summary": self.graph.summary, "seconds": self.graph.seconds, "route": self.route,
                "sentence": self.sentence,
                "perturbation_sentence": perturbation_sentence(self.graph.summary.get("perturbation"))
                if "perturbation" in self.graph.summary else None,
                "dictionary_routes": [{"layer": layer, "dictionary": self.graph.dictionaries[layer], "route": r,
                                       "sentence": text} for layer, (r, text) in self.dictionary_routes.items()]}


def prompt_ids(handle: ModelHandle, prompt: str) -> list[int]:
    """The prompt's token ids with BOS in front; an empty prompt or one beyond the model's positions
    is refused."""
    if not prompt.strip():
        raise DeepSeeMoEError("--prompt is empty; give the text whose next token the graph explains")
    tok = handle.require_tokenizer()
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None:
        ids = [tok.bos_token_id, *ids]
    limit = getattr(handle.model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and len(ids) > limit:
        raise DeepSeeMoEError(f"--prompt is {len(ids)} tokens with BOS, beyond {handle.name}'s {limit} positions "
                              "(max_position_embeddings); shorten it")
    return ids


def target_id(handle: ModelHandle, target: str) -> int:
    """The vocabulary id of a one-token target; several tokens are refused."""
    tok = handle.require_tokenizer()
    pieces = tok(target, add_special_tokens=False)["input_ids"]
    if len(pieces) != 1:
        raise DeepSeeMoEError(f"--target {target!r} is {len(pieces)} tokens ({[tok.decode([p]) for p in pieces]}); "
                              "give one token of the vocabulary, with its leading space if it has one")
    return pieces[0]


def attribute_prompt(handle: ModelHandle, dictionaries: dict[str, tuple], prompt: str, *, label: str = "",
                     target: str | None = None, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                     max_logits: int = 5, batch_size: int = 64, max_targets: int | None = None, scan: str = "",
                     slug: str = "graph",
                     descriptions: dict[tuple[str, int], str] | None = None, perturb: int = 8,
                     progress: bool = False) -> PromptGraph:
    """The pruned graph of `prompt` (its next token: `target`, else the model's top prediction), with
    its `perturb` most influential block-input features zeroed in the model run for real
    (attribution.perturb; in the summary as "perturbation")."""
    ids = prompt_ids(handle, prompt)
    tid = target_id(handle, target) if target is not None else None
    graph = build_graph(handle, torch.tensor(ids), dictionaries, target=tid, max_logits=max_logits,
                        batch_size=batch_size, max_targets=max_targets, progress=progress)
    prune(graph, node_threshold, edge_threshold)
    if perturb > 0:
        graph.summary["perturbation"] = routing_perturbation(handle, graph, dictionaries, top=perturb)
    doc = graph_json(graph, slug=slug, scan=scan, prompt=prompt, num_layers=handle.num_layers,
                     descriptions=descriptions)
    route = strongest_route(graph)
    at = {layer: strongest_route(graph, layer) for layer in sorted(graph.dictionaries)}
    return PromptGraph(label, prompt, graph, doc, route, route_sentence(route, graph.tokens),
                       {layer: (r, route_sentence(r, graph.tokens)) for layer, r in at.items() if r is not None})


def document_openings(path: Path, tokenizer, *, tokens: int = 32, domain_field: str = "domain") -> dict[str, str]:
    """The first `tokens` tokens (cut back to a whole word) of the first document of each domain of a
    JSONL corpus: the demo's prompts."""
    from deepseemoe.data.sources import TextSource, iter_documents

    out: dict[str, str] = {}
    for doc in iter_documents(TextSource(str(path), domain_field=domain_field)):
        domain = doc.domain or "(no domain)"
        if domain in out or not doc.text.strip():
            continue
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        text = tokenizer.decode(ids[:tokens])
        if len(ids) > tokens and " " in text.strip():
            text = text[:text.rstrip().rfind(" ")]  # the last word was cut: leave it to the model
        out[domain] = text.rstrip()
    return out
