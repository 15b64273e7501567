"""The explorer's model-backed views: a typed text's routing, and interventions on it.

The text goes through the same path as `deepseemoe route` (pack_documents: BOS + the document's
tokens, BOS not kept; run_capture with the routing recorder), so the strip shows exactly the
experts `route` records for that text. Interventions measure ΔCE and KL with the LossMeter of
`deepseemoe ablate` on the text's within-document predictions, so a playground ablation gives the
number `ablate --data TEXT_FILE` gives for the same expert.

Shapes: input_ids [B, S]; kept tokens T; routing per layer experts/weights [T, K], logits [T, E];
next-token distributions over the vocabulary [V] at the last kept token.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from deepseemoe.capture.consumers import RoutingRecorder
from deepseemoe.capture.core import Site, run_capture
from deepseemoe.data.sources import Document
from deepseemoe.data.token_text import token_texts
from deepseemoe.data.tokens import pack_documents
from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.handle import ModelHandle
from deepseemoe.report.components import Strip, show_token

ALTERNATIVES = 3  # the router's best unchosen experts shown per cell
NEXT = 10  # next-token candidates shown


@dataclass
class Limits:
    max_chars: int = 2000  # typed text
    ctx_len: int = 256  # tokens per context: the served run's (`route` defaults to 256), at most the model's
    max_contexts: int = 4  # contexts per request (the batch)


@dataclass
class LiveRouting:
    strip: Strip
    token_ids: list[int]
    tokens: list[str]
    experts: dict[int, list[list[int]]]  # layer -> [T][K], rank order
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / max(self.seconds, 1e-9)


@dataclass
class Intervention:
    """What the playground changes: experts of one MoE layer (ablate: weight 0; exclude: the router
    re-selects without them; force: every token to these experts, weights equal), or one feature of a
    single-site SAE (scale 0 ablates it, 2 doubles it)."""

    op: str  # ablate | exclude | force | feature
    layer: int | None = None
    experts: list[int] = field(default_factory=list)
    dictionary: str | None = None  # DictionaryView key, for op == feature
    feature: int | None = None
    scale: float = 0.0

    def describe(self) -> str:
        if self.op == "feature":
            return f"feature {self.feature} of {self.dictionary} × {self.scale:g}"
        return f"{self.op} experts {', '.join(map(str, self.experts))} in layer {self.layer}"


@dataclass
class PlaygroundResult:
    intervention: Intervention
    clean: Strip
    edited: Strip  # cells whose expert set changed are flagged
    delta_ce: float  # nats/token over the text's within-document predictions (ablate's LossMeter)
    kl: float
    predictions: int
    changed_share: dict[int, float]  # layer -> share of tokens whose expert set changed
    next_clean: list[tuple[str, float]]  # the next token after the text: (token, probability)
    next_edited: list[tuple[str, float]]
    seconds: float
    fired: int | None = None  # a feature edit: the tokens of the text where the feature fired (0: the edit is a no-op)


class LiveModel:
    """One model, loaded on first use; forwards run one at a time (hooks are per model)."""

    def __init__(self, model: str, *, device: str | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False, limits: Limits | None = None):
        self.model_ref, self.device, self.dtype = model, device, dtype
        self.trust_remote_code = trust_remote_code
        self.limits = limits or Limits()
        self._handle: ModelHandle | None = None
        self.lock = threading.Lock()

    @property
    def handle(self) -> ModelHandle:
        if self._handle is None:
            from deepseemoe.models.load import load_model

            handle = load_model(self.model_ref, dtype=self.dtype, device=self.device,
                                trust_remote_code=self.trust_remote_code)
            if not handle.is_moe:
                raise DeepSeeMoEError(f"{self.model_ref} has no MoE layers; serve a run of an MoE model")
            handle.require_tokenizer()
            self._handle = handle
        return self._handle

    def batches(self, text: str) -> list:
        """The text packed as `route` packs a one-document corpus: BOS + tokens, contexts of ctx_len."""
        text = text.replace("\r\n", "\n")  # a browser submits a textarea's line ends as CRLF
        if not text.strip():
            raise DeepSeeMoEError("the text is empty; type some text")
        if len(text) > self.limits.max_chars:
            raise DeepSeeMoEError(f"the text has {len(text)} characters; the explorer takes at most "
                                  f"{self.limits.max_chars} (start it with a larger --max-chars)")
        handle = self.handle
        limit = getattr(handle.model.config, "max_position_embeddings", None)
        ctx_len = min(self.limits.ctx_len, limit) if isinstance(limit, int) else self.limits.ctx_len
        batches = list(pack_documents(handle.tokenizer, [Document(0, text, None, "typed")],
                                      ctx_len=ctx_len, batch_size=self.limits.max_contexts))
        if len(batches) != 1:
            raise DeepSeeMoEError(f"the text is longer than {self.limits.max_contexts} contexts of "
                                  f"{self.limits.ctx_len} tokens; shorten it")
        return batches

    @torch.no_grad()
    def route(self, text: str) -> LiveRouting:
        with self.lock:
            start = time.perf_counter()
            handle = self.handle
            layers = sorted(handle.moe_layers)
            batch = self.batches(text)[0]
            recorder = RoutingRecorder(layers, logits=True)
            captured = run_capture(handle, batch.input_ids, [recorder], attention_mask=batch.attention_mask,
                                   keep=batch.keep)
            rec = recorder.batches.pop()
            ids = captured.token_ids.cpu().tolist()
            seconds = time.perf_counter() - start
        tokens = token_texts(handle.tokenizer, ids)
        routing, alternatives, margins = {}, {}, {}
        for layer in layers:
            idx, w, logits = rec["idx"][layer], rec["weights"][layer], rec["logits"][layer]
            order = torch.argsort(-w, dim=1, stable=True)  # rank 0 = highest weight, as `route` stores
            idx, w = idx.gather(1, order), w.gather(1, order)
            routing[layer] = (idx.numpy(), w.numpy())
            alternatives[layer], margins[layer] = _alternatives(logits, idx)
        strip = Strip.from_arrays(tokens, routing, "typed text", alternatives, margins)
        return LiveRouting(strip, ids, tokens, {la: routing[la][0].tolist() for la in layers}, seconds)

    @torch.no_grad()
    def intervene(self, text: str, intervention: Intervention, coder=None, site: Site | None = None) -> PlaygroundResult:
        """ΔCE, KL, next-token distribution and downstream routing of the text under `intervention`
        (`coder` and `site`: the SAE and where it reads, for op == feature)."""
        from deepseemoe.causal.steering import expert_sets_differ
        from deepseemoe.data.tokens import token_domains
        from deepseemoe.interventions.loss import LossMeter
        from deepseemoe.interventions.routing import ablate, exclude, force, route_intervention
        from deepseemoe.interventions.sites import watch_routing

        with self.lock:
            start = time.perf_counter()
            handle = self.handle
            layers = sorted(handle.moe_layers)
            batches = self.batches(text)
            batch = batches[0]
            if intervention.op == "feature":
                from deepseemoe.causal.steering import FeatureEdit

                if coder is None or site is None or intervention.feature is None:
                    raise DeepSeeMoEError("a feature intervention needs a dictionary and a feature")

                edit = FeatureEdit(handle, coder, site, intervention.feature, intervention.scale)
                edit.keep = batch.keep.to(next(handle.model.parameters()).device)

                def context():
                    return edit
            else:
                layer = intervention.layer
                if layer not in handle.moe_layers:
                    raise DeepSeeMoEError(f"layer {layer} is not an MoE layer; MoE layers: {layers}")
                moe = handle.moe_layers[layer]
                bad = [e for e in intervention.experts if not 0 <= e < moe.num_experts]
                if bad or not intervention.experts:
                    raise DeepSeeMoEError(f"choose experts among 0..{moe.num_experts - 1} of layer {layer}")
                if intervention.op == "ablate":
                    rewrite = ablate(intervention.experts)
                elif intervention.op == "exclude":
                    rewrite = exclude(intervention.experts)
                elif intervention.op == "force":
                    if len(intervention.experts) != moe.top_k:
                        raise DeepSeeMoEError(f"force needs exactly {moe.top_k} experts (layer {layer} is top-{moe.top_k})")
                    rewrite = force(intervention.experts, [1.0 / moe.top_k] * moe.top_k)
                else:
                    raise DeepSeeMoEError(f"unknown intervention {intervention.op!r}; use ablate, exclude, force or feature")

                def context():
                    return route_intervention(handle, {layer: rewrite})
            keep = batch.keep.to(next(handle.model.parameters()).device)
            last = int(torch.nonzero(keep).max())
            # the meter's own clean and changed forwards also give the routing (observers) and the
            # next-token distribution after the text (the LM head's output at its last token)
            nxt: dict[str, torch.Tensor] = {}

            def last_token(module, args, out):
                nxt["p"] = torch.softmax(out.reshape(-1, out.shape[-1])[last].float(), -1)

            head = handle.model.get_output_embeddings().register_forward_hook(last_token)
            try:
                with watch_routing(handle, layers) as calls:
                    meter = LossMeter(handle, batches, [token_domains(b) for b in batches])
                clean_routing, clean_next = {la: torch.cat(calls[la])[keep] for la in layers}, nxt["p"]
                with watch_routing(handle, layers) as calls:
                    measured = meter.measure(context)
                edited_routing, edited_next = {la: torch.cat(calls[la])[keep] for la in layers}, nxt["p"]
            finally:
                head.remove()
            seconds = time.perf_counter() - start
        tokens = token_texts(handle.tokenizer, batch.input_ids.reshape(-1)[batch.keep].tolist())
        changed = {la: expert_sets_differ(clean_routing[la], edited_routing[la]) for la in layers}
        nan_w = {la: torch.full(clean_routing[la].shape, float("nan")) for la in layers}
        clean = Strip.from_arrays(tokens, {la: (clean_routing[la].cpu().numpy(), nan_w[la].numpy()) for la in layers},
                                  "clean")
        edited = Strip.from_arrays(tokens, {la: (edited_routing[la].cpu().numpy(), nan_w[la].numpy()) for la in layers},
                                   intervention.describe(), changed={la: changed[la].tolist() for la in layers})
        return PlaygroundResult(intervention, clean, edited, measured["delta_ce"], measured["kl"],
                                int(sum(int(v.sum()) for v in meter.valid)),
                                {la: float(changed[la].float().mean()) for la in layers},
                                self._top(clean_next), self._top(edited_next), seconds,
                                edit.fired_count if intervention.op == "feature" else None)

    def _top(self, probs: torch.Tensor) -> list[tuple[str, float]]:
        p, i = probs.topk(min(NEXT, probs.numel()))
        return list(zip(map(show_token, token_texts(self.handle.tokenizer, i.tolist())), p.tolist(), strict=True))


def _alternatives(logits: torch.Tensor, chosen: torch.Tensor) -> tuple[list[list[tuple[int, float]]], list[float]]:
    """Per token: the router's best unchosen experts with their softmax probability, and the margin
    (lowest chosen logit − highest unchosen logit; negative where weights reorder the raw logits)."""
    probs = torch.softmax(logits.float(), -1)
    masked = logits.float().scatter(1, chosen.long(), float("-inf"))
    n = min(ALTERNATIVES, logits.shape[1] - chosen.shape[1])
    if n <= 0:
        return [[] for _ in range(len(logits))], [float("nan")] * len(logits)
    best = masked.topk(n, dim=1)
    low = logits.float().gather(1, chosen.long()).min(1).values
    margins = (low - best.values[:, 0]).tolist()
    alts = [[(int(e), float(probs[t, e])) for e in row] for t, row in enumerate(best.indices.tolist())]
    return alts, margins
