"""The linear replacement forward of one prompt: everything nonlinear held at its value on the prompt,
so that the model becomes an affine map from its nodes' outputs to every node's input.

Frozen (detached) at their values on the prompt:
- attention patterns (a registered attention implementation that detaches the softmax);
- every norm's scale (the output is re-entered as (out/x)·x, an elementwise map that equals the norm
  at the prompt: RMSNorm's own linearisation with 1/rms held);
- the routing: which experts each token went to and the weights they got;
- each expert's gate: SwiGLU experts compute act(gate(x))·up(x); act(gate(x)) is held, so an expert is
  the linear map x ↦ down(act(gate)·up(x)) at the prompt (its output unchanged); experts with a gate
  rule of their own (GPT-OSS: glu(gate)·(clamp(up) + 1)) run that rule with the gate columns held; a
  shared expert the same, with its sigmoid gate held;
- attention sinks (GPT-OSS): the sink logit joins each row's softmax, and the pattern is held.

Nodes write into the forward at zero-valued "injection" tensors: the embeddings and every MoE block's
output into the residual stream (`embed`, `out{l}`), the features and error of an SAE on a block's input
into that block's input (`in{l}`). Their own outputs enter as constants, so a backward from one target
node to the injection tensors gives, dotted with a source node's output vector, the direct effect of
that source on the target: the edge. Targets: active feature pre-activations, the router logits of
the chosen experts, each chosen expert's output (projected on its own direction, so the node's value is
its norm), a linearised shared expert's, and the (demeaned) logits. The map is affine, so a target's
incoming edges plus its bias terms equal its value exactly; `LinearReplacement.check` refuses a model
whose frozen forward does not reproduce its own logits and expert outputs.

With `connected` set, the same held quantities but no cut: each block's output is its linearised
function of its input (the chosen experts with their gates and weights held, a gated MLP with its gate
held), so an injection's effect reaches every later node: the total effect in the linearised model,
which `attribution.perturb` compares with the model run for real.

Shapes: S prompt positions, B copies of the prompt (one target per copy in a backward), D model
width, E experts, K chosen per token, F dictionary latents.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from deepseemoe.dictionaries.coder import CrossLayerTranscoder, SparseCoder
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.experts import (
    fused_expert_output_from_neurons,
    fused_linear,
    has_fused_layout,
    recall_expert_outputs,
)
from deepseemoe.models.handle import ModelHandle, MoELayer

FROZEN_ATTENTION = "deepseemoe_frozen"


def _frozen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with the pattern detached (the same arithmetic as transformers' eager path)."""
    if kwargs.get("softcap") is not None:
        raise DeepSeeMoEError(f"{type(module).__name__} soft-caps its attention scores, which attribution does not "
                              "freeze yet; use a model with plain softmax attention")
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    sinks = getattr(module, "sinks", None)
    if sinks is not None:
        # GPT-OSS: a learned logit per head joins every row's softmax and its share is dropped (the row's
        # weights sum to less than 1); held like the rest of the pattern
        sink = sinks.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1).to(scores.dtype)
        combined = torch.cat([scores, sink], dim=-1).float()
        probs = torch.softmax(combined - combined.max(-1, keepdim=True).values, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores.float(), dim=-1)
    probs = probs.to(query.dtype).detach()
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(FROZEN_ATTENTION, _frozen_attention)
    AttentionMaskInterface.register(FROZEN_ATTENTION, eager_mask)


def at_positions(x: torch.Tensor, pos: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[B, n]: x[b, pos[j]] · w[j] for x [B, S, D], pos [n], w [n, D] — every node's input read along its
    own direction at its own position. Grouped by position, one matmul per position: B·n·D work and
    no [B, n, D] copy; gathering x[:, pos] first (advanced indexing or index_select) made the backward
    a scatter over thousands of repeated positions, 3–4 times the rest of an attribution graph on CPU."""
    order = torch.argsort(pos, stable=True)
    ordered = pos[order]
    bounds = torch.searchsorted(ordered, torch.arange(x.shape[1] + 1, device=pos.device)).tolist()
    columns = x.unbind(1)  # views whose backward is one stack, not a zero-filled copy of x per position
    parts = [columns[p] @ w[order[bounds[p]:bounds[p + 1]]].T for p in range(x.shape[1]) if bounds[p + 1] > bounds[p]]
    if not parts:
        return x.new_zeros(x.shape[0], 0)
    return torch.cat(parts, 1)[:, torch.argsort(order)]


@dataclass
class CleanPass:
    """What the model computed on the prompt, read by hooks from its own forward."""

    ids: torch.Tensor  # [S]
    logits: torch.Tensor  # [S, V]
    block_in: dict[int, torch.Tensor]  # layer -> [S, D]
    block_out: dict[int, torch.Tensor]  # layer -> [S, D]
    idx: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE layer -> [S, K]
    weights: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE layer -> [S, K]
    router_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE layer -> [S, E]
    embeddings: torch.Tensor | None = None  # [S, D]
    tuple_out: dict[int, bool] = field(default_factory=dict)  # the block returns a tuple


def _block_module(handle: ModelHandle, layer: int) -> torch.nn.Module | None:
    if layer in handle.moe_layers:
        return handle.moe_layers[layer].block
    if layer in handle.dense_mlps:
        return handle.dense_mlps[layer].module
    return None


def clean_pass(handle: ModelHandle, ids: torch.Tensor) -> CleanPass:
    """One ordinary forward of the prompt ids [S], recording block inputs/outputs and routing."""
    rec: dict = {"in": {}, "out": {}, "tuple": {}, "route": {}}
    hooks = []
    for layer in range(handle.num_layers):
        block = _block_module(handle, layer)
        if block is None:
            continue

        def pre(mod, args, kwargs, layer=layer):
            x = args[0] if args else kwargs["hidden_states"]
            rec["in"][layer] = x.detach()[0].float().clone()

        def post(mod, args, out, layer=layer):
            rec["tuple"][layer] = isinstance(out, tuple)
            rec["out"][layer] = (out[0] if isinstance(out, tuple) else out).detach()[0].float().clone()
        hooks += [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post)]
    for layer, moe in handle.moe_layers.items():
        hooks += moe.adapter.observe(moe, lambda ev, layer=layer: rec["route"].setdefault(layer, ev))
    emb = handle.model.get_input_embeddings()
    hooks.append(emb.register_forward_hook(lambda m, a, o: rec.__setitem__("emb", o.detach()[0].float().clone())))
    try:
        with torch.no_grad():
            logits = handle.model(ids[None].to(emb.weight.device)).logits[0].float()
    finally:
        for h in hooks:
            h.remove()
    clean = CleanPass(ids, logits, rec["in"], rec["out"], embeddings=rec.get("emb"), tuple_out=rec["tuple"])
    for layer, ev in rec["route"].items():
        clean.idx[layer] = ev.idx.reshape(len(ids), -1).long()
        clean.weights[layer] = ev.weights.reshape(len(ids), -1).float()
        if ev.logits is not None:
            clean.router_logits[layer] = ev.logits.reshape(len(ids), -1).float()
    return clean


# ---- experts at the prompt ------------------------------------------------------------------------

def check_experts(moe: MoELayer) -> None:
    """Refuse experts whose frozen-gate linearisation DeepSeeMoE cannot write."""
    ex = moe.experts
    name = type(ex).__name__
    if ex is None or not has_fused_layout(ex):
        raise DeepSeeMoEError(f"layer {moe.layer}: {name} is not a fused experts module (gate_up_proj / down_proj); "
                              "attribution through its experts is not supported")
    if getattr(ex, "has_post_expert_norm", False):
        raise DeepSeeMoEError(f"layer {moe.layer}: {name} normalises each expert's output; attribution through its "
                              "experts is not supported")


def _gate_held(experts, gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2F] with its gate columns detached (the first half in the concatenated layout, the
    even columns in the interleaved one, as transformers' layout flag says)."""
    F2 = gate_up.shape[-1]
    is_gate = torch.zeros(F2, dtype=torch.bool, device=gate_up.device)
    if getattr(experts, "is_concatenated", True):
        is_gate[: F2 // 2] = True
    else:
        is_gate[::2] = True
    return torch.where(is_gate, gate_up.detach(), gate_up)


def frozen_expert(experts, x: torch.Tensor, expert: int) -> torch.Tensor:
    """One expert's output on x [..., D] with its gate held: the module's own gate rule (`_apply_gate`)
    on gate_up(x) whose gate columns are constants — down(act(gate).detach() · up(x)) for SwiGLU,
    down(glu(gate).detach() · (clamp(up(x)) + 1)) for GPT-OSS (its clamp's slope, 0 or 1, as at the prompt)."""
    t = bool(experts.is_transposed)
    if experts.has_gate:
        bias = experts.gate_up_proj_bias[expert] if experts.has_bias else None
        h = experts._apply_gate(_gate_held(experts, fused_linear(x, experts.gate_up_proj[expert], bias, t)))
    else:
        bias = experts.up_proj_bias[expert] if experts.has_bias else None
        u = fused_linear(x, experts.up_proj[expert], bias, t)
        ratio = torch.where(u != 0, experts.act_fn(u) / u, torch.zeros_like(u))
        h = ratio.detach() * u
    return fused_expert_output_from_neurons(experts, h, expert)


def _gated_mlp(module) -> bool:
    return all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def frozen_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """A SwiGLU MLP (gate_proj / up_proj / down_proj) on x with act(gate_proj(x)) held."""
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)).detach() * mlp.up_proj(x))


# ---- the replacement ------------------------------------------------------------------------------

@dataclass
class Sources:
    """Nodes writing at one injection tensor: node ids [n], their positions [n], output vectors [n, D]."""

    leaf: str
    node: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    vec: list[torch.Tensor] = field(default_factory=list)


@dataclass
class LayerPlan:
    """How one layer appears in the graph: 'experts' (routing, expert and shared nodes, optionally an
    SAE on the block input in front of them), 'transcoder' (the block replaced by a transcoder's
    features and error, or by one layer of a cross-layer transcoder: the features it encodes here,
    which write to this layer's block output and later ones, and the error of this layer's output),
    or 'frozen' (a block DeepSeeMoE does not open: one node per position)."""

    layer: int
    mode: str
    sae: SparseCoder | None = None  # folded, on the block input (mode 'experts')
    transcoder: SparseCoder | None = None  # folded, block input -> block output (mode 'transcoder')
    sae_name: str = ""
    transcoder_name: str = ""
    clt: CrossLayerTranscoder | None = None  # folded (mode 'transcoder'), read at its site `clt_site` here
    clt_site: int = -1
    clt_layers: tuple[int, ...] = ()  # the CLT's layers in site order (its site i reads clt_layers[i])

    @property
    def dictionary(self) -> str:
        """The name of the dictionary explaining this layer ("" for none)."""
        return self.sae_name or self.transcoder_name

    def encoder(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(W_enc [D, F], b_enc [F], b_in or None) of the features encoded at this layer:
        pre = (x − b_in) @ W_enc + b_enc."""
        if self.clt is not None:
            return self.clt.W_enc[self.clt_site], self.clt.b_enc[self.clt_site], None
        coder = self.sae if self.mode == "experts" else self.transcoder
        return coder.W_enc, coder.b_enc, None if coder.cfg.is_transcoder else coder.b_dec


class LinearReplacement:
    """Node inventory (filled by graph.py through `add_*`) and the frozen forward that computes every
    target node's value for B copies of the prompt."""

    def __init__(self, handle: ModelHandle, clean: CleanPass, plans: dict[int, LayerPlan]):
        self.handle, self.clean, self.plans = handle, clean, plans
        self.S = len(clean.ids)
        self.sources: dict[str, Sources] = {}
        # target groups by key, in the order their values are concatenated: key -> (node ids, spec)
        self.targets: dict[str, tuple[list[int], dict]] = {}
        self.unit: dict[int, torch.Tensor] = {}  # expert layer -> [n, D] unit output directions (constant)
        self.shared_unit: dict[int, torch.Tensor] = {}
        self.shared_linear: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}  # layer -> (mlp, gate [S])
        self.logit_ids: list[int] = []
        self.connected = False  # blocks pass their (linearised) output on instead of the cut constant

    def source(self, leaf: str) -> Sources:
        return self.sources.setdefault(leaf, Sources(leaf))

    def target_order(self) -> list[int]:
        return [n for nodes, _ in self.targets.values() for n in nodes]

    # ---- the forward ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _installed(self, B: int, leaves: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> Iterator[None]:
        model = self.handle.model
        _register_attention()
        old_attn = model.config._attn_implementation
        hooks, patched = [], []
        grads = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for p, _ in grads:
                p.requires_grad_(False)
            model.set_attn_implementation(FROZEN_ATTENTION)
            emb = model.get_input_embeddings()
            hooks.append(emb.register_forward_hook(lambda m, a, o: o.detach() + leaves["embed"]))
            for mod in model.modules():
                if type(mod).__name__.endswith(("RMSNorm", "LayerNorm")) and not list(mod.children()):
                    hooks.append(mod.register_forward_hook(_freeze_norm, with_kwargs=True))
            for layer in range(self.handle.num_layers):
                block = _block_module(self.handle, layer)
                if block is None:
                    continue
                plan = self.plans[layer]
                fn = self._block_fn(plan, B, leaves, values)
                patched.append(block)
                block.forward = fn  # an instance attribute shadows the class's forward until deleted
            yield
        finally:
            for h in hooks:
                h.remove()
            for block in patched:
                del block.forward
            model.set_attn_implementation(old_attn)
            for p, flag in grads:
                p.requires_grad_(flag)

    def _block_fn(self, plan: LayerPlan, B: int, leaves: dict, values: dict):
        clean, layer = self.clean, plan.layer

        def forward(hidden_states=None, *args, **kwargs):
            h = hidden_states.float()  # [B, S, D], a linear function of the injection tensors
            if self.connected:
                out = (self._linearised_block(plan, h, leaves) + leaves[f"out{layer}"]).to(hidden_states.dtype)
                return (out, None) if clean.tuple_out.get(layer) else out
            out = clean.block_out[layer].to(h.device).expand(B, -1, -1)
            if plan.mode == "experts":
                self._experts_layer(plan, h, leaves, values)
            elif plan.mode == "transcoder":
                tc = plan.transcoder
                self._feature_targets(f"feat{layer}", plan, h, values)
                if tc is not None and tc.W_skip is not None:  # the skip path is linear: it stays in the gradient
                    # (h − h.detach()) is zero with h's gradient: the value stays the model's own, where
                    # adding skip(h) and subtracting skip at the prompt cancels two large terms in float32
                    out = out + (h - h.detach()) @ tc.W_skip.T
            out = (out + leaves[f"out{layer}"]).to(hidden_states.dtype)
            return (out, None) if clean.tuple_out.get(layer) else out
        return forward

    def _linearised_block(self, plan: LayerPlan, h: torch.Tensor, leaves: dict) -> torch.Tensor:
        """[B, S, D] the model's own block as a linear function of its input h (connected mode): an SAE's
        injection added to the input, the chosen experts with gates and weights held, the shared
        expert linearised (else its value at the prompt), a gated MLP with its gate held; a block
        DeepSeeMoE cannot linearise passes its value at the prompt on (a constant)."""
        layer, clean = plan.layer, self.clean
        const = clean.block_out[layer].to(h.device).expand(h.shape[0], -1, -1)
        if layer not in self.handle.moe_layers:
            module = _block_module(self.handle, layer)
            return frozen_mlp(module, h) if _gated_mlp(module) else const
        x = h + leaves[f"in{layer}"] if f"in{layer}" in leaves else h
        moe = self.handle.moe_layers[layer]
        idx, w = clean.idx[layer].to(h.device), clean.weights[layer].to(h.device)  # [S, K]
        out = torch.zeros_like(h)
        for e in idx.unique().tolist():
            ps, ks = (idx == e).nonzero(as_tuple=True)
            y = frozen_expert(moe.experts, x[:, ps, :], e) * (w[ps, ks] * moe.routed_scale)[None, :, None]
            out = out.index_add(1, ps, y)
        if layer in self.shared_linear:
            mlp, gate = self.shared_linear[layer]
            out = out + frozen_mlp(mlp, x) * gate[None, :, None]
        elif moe.shared_paths:
            out = out + (clean.block_out[layer] - expert_vectors(self.handle, clean, layer).sum(1)).to(h.device)
        return out

    def _feature_targets(self, key: str, plan: LayerPlan, h: torch.Tensor, values: dict) -> None:
        pos, feat = self.targets[key][1]["pos"], self.targets[key][1]["feature"]
        W_enc, b_enc, b_in = plan.encoder()
        xin = h if b_in is None else h - b_in
        values[key] = at_positions(xin, pos, W_enc[:, feat].T) + b_enc[feat]

    def _experts_layer(self, plan: LayerPlan, h: torch.Tensor, leaves: dict, values: dict) -> None:
        layer, clean = plan.layer, self.clean
        moe = self.handle.moe_layers[layer]
        if plan.sae is not None:
            self._feature_targets(f"feat{layer}", plan, h, values)
            x = clean.block_in[layer].to(h.device) + leaves[f"in{layer}"]  # the block now reads the SAE's nodes
        else:
            x = h
        spec = self.targets[f"router{layer}"][1]
        W_r, b_r = spec["W_r"], spec["b_r"]
        z = at_positions(x, spec["pos"], W_r[spec["expert"]])  # [B, n]: each node's router row at its position
        values[f"router{layer}"] = z + (b_r[spec["expert"]] if b_r is not None else 0)
        spec = self.targets[f"expert{layer}"][1]
        outs = torch.zeros(h.shape[0], len(spec["pos"]), h.shape[-1], device=h.device)
        for e in spec["expert"].unique().tolist():
            rows = (spec["expert"] == e).nonzero().squeeze(1)
            y = frozen_expert(moe.experts, x[:, spec["pos"][rows], :], e)
            outs[:, rows] = y * (spec["weight"][rows] * moe.routed_scale)[None, :, None]
        values[f"expert{layer}"] = (outs * self.unit[layer][None]).sum(-1)
        values[f"expert_vectors{layer}"] = outs[0].detach()
        if layer in self.shared_linear:
            mlp, gate = self.shared_linear[layer]
            s = frozen_mlp(mlp, x) * gate[None, :, None]
            values[f"shared{layer}"] = (s * self.shared_unit[layer][None]).sum(-1)
            values[f"shared_vectors{layer}"] = s[0].detach()

    def run(self, B: int, inject: dict[str, torch.Tensor] | None = None
            ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        """The frozen forward of B copies: (injection tensors, target values [B, N_t] in
        `target_order()`, everything recorded). `inject` {leaf: [B, S, D]} sets injection tensors
        (a perturbation) instead of zeros."""
        D = self.clean.block_in[next(iter(self.clean.block_in))].shape[-1]
        leaves = {name: torch.zeros(B, self.S, D, requires_grad=True) for name in self.sources}
        leaves.update(inject or {})
        for name in ("embed", *(f"out{la}" for la in self.plans if _block_module(self.handle, la) is not None)):
            leaves.setdefault(name, torch.zeros(B, self.S, D, requires_grad=True))
        values: dict[str, torch.Tensor] = {}
        with self._installed(B, leaves, values):
            # the last position's logits only: at a real vocabulary the unembedding of every position, in
            # B copies, would dominate the forward and each backward
            logits = self.handle.model(self.clean.ids[None].expand(B, -1), logits_to_keep=1).logits[:, -1].float()
        values["logits_last"] = logits[0].detach()
        ids = torch.tensor(self.logit_ids, dtype=torch.long)
        values["logit"] = logits[:, ids] - logits.mean(-1, keepdim=True)
        # connected, the blocks compute no node values: the logits are what a perturbation reads
        order = values["logit"] if self.connected else torch.cat([values[key] for key in self.targets], dim=1)
        return leaves, order, values

    def check(self, values: dict[str, torch.Tensor]) -> None:
        """The frozen forward must be the model at the prompt: same final logits, same expert outputs."""
        ref = self.clean.logits[-1]
        got = values["logits_last"]
        tol = 1e-3 * max(1.0, float(ref.abs().max()))
        if float((got - ref).abs().max()) > tol:
            raise DeepSeeMoEError(f"{self.handle.name}: the frozen forward does not reproduce the model's logits (max "
                                  f"difference {float((got - ref).abs().max()):.2e}); attribution does not support "
                                  f"{self.handle.model_type} models yet")
        for key, (_, spec) in self.targets.items():
            if key.startswith("expert") and "clean_vectors" in spec:
                diff = float((values[f"expert_vectors{key[6:]}"] - spec["clean_vectors"]).abs().max())
                if diff > 1e-3 * max(1.0, float(spec["clean_vectors"].abs().max())):
                    raise DeepSeeMoEError(f"layer {key[6:]}: the experts held at their gates do not reproduce "
                                          f"the experts' outputs (max difference {diff:.2e}); attribution does not "
                                          f"support {self.handle.model_type} experts yet")


def _freeze_norm(module, args, kwargs, out):
    """A norm's output re-entered as c⊙x with c = out/x held: equal to the norm at the prompt, linear in x."""
    x = args[0] if args else kwargs["hidden_states"]
    if isinstance(out, tuple) or out.shape != x.shape:
        return None
    xd, od = x.detach(), out.detach()
    c = torch.where(xd != 0, od / torch.where(xd != 0, xd, torch.ones_like(xd)), torch.zeros_like(xd))
    return (c * x).to(out.dtype)


def expert_vectors(handle: ModelHandle, clean: CleanPass, layer: int) -> torch.Tensor:
    """[S, K, D] what each chosen expert wrote into the block output (weight and block scale applied),
    from the model's own experts module."""
    moe = handle.moe_layers[layer]
    x = clean.block_in[layer]
    dtype = next(moe.experts.parameters()).dtype
    y = recall_expert_outputs(moe.experts, x.to(dtype), clean.idx[layer]).float()
    return y * (clean.weights[layer] * moe.routed_scale)[..., None]


def shared_mlp(handle: ModelHandle, layer: int) -> torch.nn.Module | None:
    """The MoE layer's one shared SwiGLU MLP, if it has exactly one."""
    moe = handle.moe_layers[layer]
    found = []
    for path in moe.shared_paths:
        mod = moe.block.get_submodule(path) if not path.startswith(moe.block_path) else \
            handle.model.get_submodule(path)
        if _gated_mlp(mod):
            found.append(mod)
    return found[0] if len(found) == 1 else None
