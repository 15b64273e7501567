"""What the rest of the toolkit knows about a loaded model: its decoder layers, its MoE layers
and the rules (the adapter) that read and rewrite each MoE layer's routing.

Shapes: T tokens (batch-major flattening of [B, S]), D model width, E routed experts,
K experts per token, F expert hidden width.

Every architecture-specific fact lives in a `MoEAdapter` subclass (one per design family,
selected by `models.registry`); capture and interventions only ever call the methods below,
so they never branch on the architecture.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deepseemoe.errors import DeepSeeMoEError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.hooks import RemovableHandle


DEFAULT_CTX_LEN = 256  # tokens per packed sequence when the command line names none

@dataclass
class RoutingEvent:
    """One MoE layer's routing for one forward call, as the experts actually received it.

    `weights` are the coefficients the routed experts are mixed with (after renormalisation,
    `routed_scaling_factor` applied inside the router, and correction-bias selection); a
    block-level post-scale outside the experts module is *not* folded in (see `MoELayer.combine`).
    """

    x: torch.Tensor  # [T, D] experts input
    idx: torch.Tensor  # [T, K] int64 expert ids
    weights: torch.Tensor  # [T, K]
    logits: torch.Tensor | None = None  # [T, E] raw router logits (pre-softmax/sigmoid)
    output: torch.Tensor | None = None  # [T, D] routed experts output (Σ_k w_k·E_k(x)), when available


# rewrite(layer, idx[T,K], weights[T,K], logits[T,E] | None) -> (idx, weights)
# A config attribute some models carry: the domain each expert was trained on, in expert order
# (the zoo's separately trained experts write it; hub models do not have it).
EXPERT_NAMES = "expert_names"


def declared_expert_names(config) -> list[str] | None:
    names = getattr(config, EXPERT_NAMES, None)
    return [str(n) for n in names] if names else None


RoutingRewrite = Callable[["MoELayer", "torch.Tensor", "torch.Tensor", "torch.Tensor | None"],
                          tuple["torch.Tensor", "torch.Tensor"]]


class MoEAdapter(ABC):
    """The rules of one MoE design family. Stateless; one instance may serve many layers."""

    name: str = "abstract"

    @abstractmethod
    def observe(self, layer: MoELayer, callback: Callable[[RoutingEvent], None]) -> list[RemovableHandle]:
        """Register read-only hooks that call `callback` once per forward of this layer."""

    @abstractmethod
    def intervene(self, layer: MoELayer, rewrite: RoutingRewrite) -> list[RemovableHandle]:
        """Register hooks (run before any observer) that replace the layer's routing."""

    @abstractmethod
    def expert_outputs(self, layer: MoELayer, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Unweighted outputs of the chosen experts: x [T, D], idx [T, K] -> [T, K, D]."""

    def expert_neurons(self, layer: MoELayer, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Hidden activations of one expert (the input of its down projection): [T, D] -> [T, F]."""
        raise NotImplementedError(f"{self.name} adapter does not expose expert neurons")

    def select(self, layer: MoELayer, logits: torch.Tensor,
               banned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-run the router's own selection on logits [T, E] with experts `banned` ([E] bool)
        made unselectable; returns (idx [T, K], weights [T, K]). Used by 'exclude'."""
        raise NotImplementedError(f"router family {layer.router_family!r} has no selector")

    def block_output(self, layer: MoELayer, output: Any) -> torch.Tensor:
        """The block's hidden-state output from whatever its forward returned."""
        return output[0] if isinstance(output, tuple) else output


@dataclass
class MoELayer:
    """One MoE layer of a model: where its modules are and how it routes."""

    layer: int  # decoder-layer index (not the index among MoE layers)
    block_path: str
    block: nn.Module
    router_path: str | None
    router: nn.Module | None
    experts_path: str | None
    experts: nn.Module | None
    num_experts: int
    top_k: int
    router_family: str  # e.g. "softmax_topk", "softmax_topk_renorm", "topk_softmax", "sigmoid_bias_group", "sparsemixer"
    combine: str  # e.g. "routed", "routed+shared", "routed+gated_shared", "scaled_routed+shared"
    adapter: MoEAdapter
    shared_paths: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # known defects or caveats, shown by `deepseemoe inspect`
    routed_scale: float = 1.0  # block-level factor applied to the routed sum after the experts module


@dataclass
class DenseMLP:
    """A dense feed-forward layer, whose hidden units ("neurons") play the role of experts."""

    layer: int
    path: str
    module: nn.Module
    neuron_path: str  # module whose *input* is the neuron activation [.., F] (e.g. down_proj)
    num_neurons: int


def fed_moe_layer(site, moe_layers) -> int | None:
    """The MoE layer a site's activation feeds: its own layer for block and router sites and
    resid_in, the next MoE layer after a resid_out; None when no MoE layer is at or after it."""
    start = site.layer + 1 if site.kind == "resid_out" else site.layer
    later = [la for la in sorted(moe_layers) if la >= start]
    return later[0] if later else None


@dataclass
class ModelHandle:
    """A loaded causal LM and everything the toolkit found in it."""

    model: nn.Module
    tokenizer: Any | None
    name: str  # hub id or folder
    model_type: str
    layers_path: str  # e.g. "model.layers"
    layers: list[nn.Module]
    moe_layers: dict[int, MoELayer] = field(default_factory=dict)  # by decoder-layer index
    dense_mlps: dict[int, DenseMLP] = field(default_factory=dict)  # by decoder-layer index

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # ---- sites: the one place that maps a capture site to the model --------------------------------
    # A site (kind, layer) is read and rewritten at a module's input (…_in) or output (…_out):
    #   resid_in / resid_out   the decoder layer            block_in / block_out   the MoE block (or dense MLP)
    #   router_logits          the router's output          mlp_neurons            the input of the MLP's down proj

    def site_module(self, site) -> nn.Module:
        """The module whose input (…_in, mlp_neurons) or output (…_out, router_logits) is the site."""
        if not 0 <= site.layer < self.num_layers:
            raise DeepSeeMoEError(f"layer {site.layer} does not exist; the model has layers 0..{self.num_layers - 1}")
        if site.kind in ("resid_in", "resid_out"):
            return self.layers[site.layer]
        moe, dense = self.moe_layers.get(site.layer), self.dense_mlps.get(site.layer)
        if site.kind == "router_logits":
            if moe is None:
                raise DeepSeeMoEError(f"layer {site.layer} is not an MoE layer; MoE layers: {sorted(self.moe_layers)}")
            return moe.router
        if site.kind == "mlp_neurons":
            if dense is None:
                raise DeepSeeMoEError(f"layer {site.layer} has no dense MLP; use expert_out on MoE layers")
            return self.model.get_submodule(dense.neuron_path)
        if site.kind in ("block_in", "block_out"):
            if moe is not None:
                return moe.block
            if dense is not None:
                return dense.module
            raise DeepSeeMoEError(f"layer {site.layer} has no MoE block or MLP")
        raise DeepSeeMoEError(f"site {site.kind} is not tied to one module")

    def site_width(self, site) -> int:
        """Features per token at a site that can feed a dictionary."""
        if site.kind == "router_logits":
            self.site_module(site)  # refuses a layer without a router
            return self.moe_layers[site.layer].num_experts
        if site.kind in ("resid_in", "resid_out", "block_in", "block_out"):
            config = self.model.config
            config = getattr(config, "get_text_config", lambda: config)()
            return int(config.hidden_size)
        raise DeepSeeMoEError(f"site {site.kind} cannot feed a coder; use resid_*, block_* or router_logits")

    # The module whose *output* is a block's input, where a decoder layer names it so.
    PRE_BLOCK_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "ffn_norm")

    def output_module_path(self, site) -> str | None:
        """The module whose output is the site (what SAELens' hf_hook_name and sparsify's hookpoints
        name): layer L−1 (or the embedding) for resid_in of L, the pre-block norm for block_in; None
        when the model has no such module DeepSeeMoE can name."""
        L = site.layer
        if site.kind == "resid_out":
            return f"{self.layers_path}.{L}"
        if site.kind == "resid_in":
            if L > 0:
                return f"{self.layers_path}.{L - 1}"
            embedding = self.model.get_input_embeddings()
            return next((name for name, m in self.model.named_modules() if m is embedding), None)
        if site.kind == "block_in":
            from torch import nn

            decoder = self.layers[L]
            norm = next((a for a in self.PRE_BLOCK_NORMS if isinstance(getattr(decoder, a, None), nn.Module)), None)
            return f"{self.layers_path}.{L}.{norm}" if norm else None
        moe = self.moe_layers.get(L)
        if site.kind == "router_logits":
            return moe.router_path if moe is not None else None
        if site.kind == "block_out":
            return moe.block_path if moe is not None else self.dense_mlps[L].path
        return None

    def hook_names(self, site) -> dict[str, str | None]:
        """The site in the other tools' words: "hf", the Hugging Face module whose output it is (None
        if unnamed); "sparsify", that module relative to the base model (sparsify hooks outputs);
        "block", the MoE block (or MLP) module relative to the base model, which sparsify transcoders
        hook (input → output); and "tl", a TransformerLens hook name."""
        L = site.layer
        prefix = getattr(self.model, "base_model_prefix", "model") + "."
        hf = self.output_module_path(site)
        if site.kind in ("resid_in", "resid_out"):
            tl = f"blocks.{L}.hook_resid_{'pre' if site.kind == 'resid_in' else 'post'}"
        else:
            tl = {"block_in": f"blocks.{L}.ln2.hook_normalized", "block_out": f"blocks.{L}.hook_mlp_out",
                  "router_logits": f"blocks.{L}.mlp.hook_router_logits"}[site.kind]
        moe = self.moe_layers.get(L)
        block = moe.block_path if moe is not None else (self.dense_mlps[L].path if L in self.dense_mlps else None)
        return {"hf": hf, "sparsify": hf.removeprefix(prefix) if hf else None,
                "block": block.removeprefix(prefix) if block else None, "tl": tl}

    def attention_module(self, layer: int) -> nn.Module | None:
        """A decoder layer's attention module (self_attn / attention), None when it has neither."""
        decoder = self.layers[layer]
        return getattr(decoder, "self_attn", None) or getattr(decoder, "attention", None)

    def attention_output(self, layer: int) -> tuple[nn.Module, int] | None:
        """The attention output projection of a decoder layer and the number of heads whose outputs it
        reads, concatenated ([.., heads·head_dim]): head h is slice h of its input. None when the layer
        has no projection DeepSeeMoE knows (o_proj / dense)."""
        attn = self.attention_module(layer)
        proj = None if attn is None else getattr(attn, "o_proj", None) or getattr(attn, "dense", None)
        if proj is None:
            return None
        config = self.model.config
        config = getattr(config, "get_text_config", lambda: config)()
        return proj, int(config.num_attention_heads)

    def check_ctx_len(self, ctx_len: int | None) -> int:
        """`ctx_len` when the model can attend that far; one-line refusal beyond its position limit.
        None: DEFAULT_CTX_LEN, or the model's limit when that is smaller (the demo's models have 128
        positions: a fixed default of 256 failed on them after the model had loaded)."""
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if ctx_len is None:
            return min(DEFAULT_CTX_LEN, limit) if isinstance(limit, int) and limit > 0 else DEFAULT_CTX_LEN
        if isinstance(limit, int) and ctx_len > limit:
            raise DeepSeeMoEError(f"--ctx-len {ctx_len} is beyond {self.name}'s {limit} positions "
                                  f"(max_position_embeddings); use --ctx-len {limit} or less")
        return ctx_len

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise DeepSeeMoEError(f"{self.name} has no tokenizer, so it cannot read text; use a folder saved with "
                                  "its tokenizer (tokenizer.json), e.g. the demo's runs/demo models")
        return self.tokenizer
