"""The wiring of a model's feed-forward neurons, and whether it falls apart into modules
(`deepseemoe wiring`): MoE vs dense, float vs ternary, on one footing.

Nodes: the hidden neurons of every feed-forward layer — an MoE's expert neurons (labelled by their
expert), a dense model's MLP neurons. Edges: neuron i of layer l → neuron j of layer l+1 with the
virtual weight of the direct residual path, w_ij = r_j · d_i, where d_i [D] is the column of the
down projection neuron i writes with and r_j [D] the gate row (else the up row) neuron j reads
with. Norms and attention in between are ignored: this is the weights' own graph, the one the
"sparse logic graph" argument is about. For a ternary model the matrices are ternary, so the
virtual weights are sums of trit products. Sparsification is explicit: an edge is kept when it is
among the `fan_in` strongest |w_ij| into its reader or out of its writer, so no neuron is left
without edges (the share of the total |w| mass kept is reported).

Modules: `graphs.modules.find_modules` (Louvain) on |w|, with z against rewirings *within each pair of
consecutive layers* (degrees per layer pair kept): edges only ever join consecutive layers, and a
rewiring across layers would make any layered graph, random weights included, look modular. For an
MoE, NMI(module; expert) against the same NMI with the expert labels shuffled within each layer
(the label includes its layer, so a module that is merely a band of layers scores NMI > 0 whatever
the experts are: the excess over the shuffles is what the experts add), and NMI(module; layer)
beside it, which is depth.

Shapes: read R_l [N_l, D], write W_l [N_l, D] per layer; virtual weights R_{l+1} @ W_lᵀ [N_{l+1}, N_l].
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.graphs.modules import aligned, find_modules, nmi
from deepseemoe.models.handle import ModelHandle


@dataclass
class LayerNeurons:
    layer: int
    read: torch.Tensor  # [N, D]
    write: torch.Tensor  # [N, D]
    expert: np.ndarray | None  # [N] the expert of each neuron (an MoE), else None


def _rows(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A [out, in] matrix's rows, whichever way the module stores it."""
    return weight.T if transposed else weight


@torch.no_grad()
def feed_forward_neurons(handle: ModelHandle) -> list[LayerNeurons]:
    """Read and write vectors of every feed-forward neuron, layer by layer."""
    out = []
    for la, moe in sorted(handle.moe_layers.items()):
        ex = moe.experts
        if not all(hasattr(ex, a) for a in ("down_proj", "is_transposed")):
            raise DeepSeeMoEError(f"layer {la}: {type(ex).__name__} has no fused experts layout; wiring needs one")
        t = bool(ex.is_transposed)
        reads, writes = [], []
        for e in range(moe.num_experts):
            if getattr(ex, "has_gate", False):
                rows = _rows(ex.gate_up_proj[e], t)  # [2F, D]: gate rows first
                reads.append(rows[: rows.shape[0] // 2])
            else:
                reads.append(_rows(ex.up_proj[e], t))
            writes.append(_rows(ex.down_proj[e], t).T)  # [D, F] → [F, D]: column i = what neuron i writes
        width = reads[0].shape[0]
        out.append(LayerNeurons(la, torch.cat(reads).float(), torch.cat(writes).float(),
                                np.repeat(np.arange(moe.num_experts), width)))
    if out:
        return out
    for la, mlp in sorted(handle.dense_mlps.items()):
        m = mlp.module
        read = getattr(m, "gate_proj", None) or getattr(m, "up_proj", None)
        down = getattr(m, "down_proj", None)
        if read is None or down is None:
            raise DeepSeeMoEError(f"layer {la}: {type(m).__name__} has no gate/up and down projections")
        out.append(LayerNeurons(la, read.weight.float(), down.weight.T.float(), None))
    if not out:
        raise DeepSeeMoEError(f"{handle.name} has no feed-forward layers DeepSeeMoE knows")
    return out


@torch.no_grad()
def wiring_graph(layers: list[LayerNeurons], fan_in: int = 8):
    """The sparsified neuron graph (networkx, undirected, weight = |w|) and what the threshold kept."""
    import networkx as nx

    g = nx.Graph()
    kept_mass = total_mass = 0.0
    for layer in layers:
        for i in range(len(layer.read)):
            g.add_node((layer.layer, i))
    for a, b in itertools.pairwise(layers):
        w = (b.read @ a.write.T).abs()  # [N_b, N_a]
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep.scatter_(1, w.topk(min(fan_in, w.shape[1]), dim=1).indices, True)  # each reader's strongest inputs
        keep.scatter_(0, w.topk(min(fan_in, w.shape[0]), dim=0).indices, True)  # each writer's strongest outputs
        total_mass += float(w.sum())
        kept_mass += float(w[keep].sum())
        for j, i in keep.nonzero().tolist():
            g.add_edge((a.layer, i), (b.layer, j), weight=float(w[j, i]))
    return g, {"fan_in": fan_in, "mass_kept": kept_mass / total_mass if total_mass else None}


NULL = "rewired within each pair of consecutive layers (degrees per layer pair kept)"


def _layer(node: tuple[int, int]) -> int:
    return node[0]


def wiring_modules(handle: ModelHandle, *, fan_in: int = 8, draws: int = 5, seed: int = 0,
                   label_draws: int = 200) -> dict:
    """Modules of the neuron graph with their significance against the layered null, and for an MoE
    their alignment with experts against a within-layer label shuffle (`label_draws` shuffles)."""
    if fan_in < 1:
        raise DeepSeeMoEError(f"--fan-in {fan_in}: keep at least 1 incoming edge per neuron")
    layers = feed_forward_neurons(handle)
    if len(layers) < 2:
        raise DeepSeeMoEError(f"{handle.name} has one feed-forward layer; the wiring links consecutive layers")
    g, kept = wiring_graph(layers, fan_in)
    mods = find_modules(g, draws=draws, seed=seed, part=_layer, null=NULL)
    member = mods.membership()
    out = {"model": handle.name, "kind": "moe" if handle.is_moe else "dense", "layers": len(layers),
           "neurons": g.number_of_nodes(), "edges": g.number_of_edges(), **kept,
           "modules": len(mods.communities), "modularity": mods.modularity,
           "rewired_modularity": mods.rewired_mean, "excess_modularity": mods.modularity - mods.rewired_mean,
           "z": mods.z, "null": NULL, "largest_module_share": len(mods.communities[0]) / g.number_of_nodes(),
           "nmi_layer": nmi(member, {n: n[0] for n in g.nodes})}
    if layers[0].expert is not None:
        expert = {(la.layer, i): (la.layer, int(e)) for la in layers for i, e in enumerate(la.expert)}
        out.update(aligned(member, expert, stratum=_layer, draws=label_draws, seed=seed).as_dict("nmi_expert"))
    return out
