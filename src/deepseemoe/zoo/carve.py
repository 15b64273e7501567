"""Carve a dense Llama-style model into a Mixture of Experts, training-free (CMoE-style).

Per carved layer, the F feed-forward neurons of the SwiGLU block (down · (silu(gate x) ⊙ up x)) are
cut into `experts` equal parts of w = F / experts neurons:
  shared   the `shared` parts of the neurons active on most calibration tokens (a neuron is active on
           a token when its |activation| is among the token's top m, m = the neurons a token keeps in
           the carved model: (shared + top_k) · w), one always-on shared expert;
  routed   the rest, as balanced clusters of neurons that fire together: k-means on each neuron's
           |activation| profile over the calibration tokens (unit rows, cosine), every cluster held
           to exactly w neurons by a greedy balanced assignment; `split="random"` deals them out at
           random instead (the control).
A router per layer is fitted by ridge least squares to predict, from the block's input x, the output
norm ‖down_e · h_e(x)‖ each routed expert would give; its top-k are the experts that carry the most.
`router="analytic"` is CMoE's instead (Pei et al. 2025), for comparison: no fit, each expert scored
by its most central neuron (the one whose activation profile over the calibration tokens is closest
to its expert's mean profile) — the router row is that neuron's gate projection.

Saved as `Qwen2MoeForCausalLM` (Llama's attention without q/k/v bias, the same norms, embeddings and
RoPE), which plain transformers loads. The weighting keeps the carve exact where it can be: the
router does not renormalise (norm_topk_prob = false), each routed expert's down projection is scaled
by E_routed and its logits are tempered to a spread of ROUTER_SPREAD, so a selected expert's weight
E·softmax(l)_e is 1 ± ~0.3 %; the shared expert's gate weight is zero (sigmoid 0.5) and its down
projection doubled. With the router zeroed and every expert selected the carved model computes the
dense one exactly (up to float rounding); at top-k < E it drops the unselected neurons, and that
loss is measured (held-out CE per domain, router recall of the true top-k, output error), not assumed.

The cost of tempering: the recorded gate weights of a carved model are all ≈ 1/E (what the router
says is its choice, not a confidence).

Shapes: x [N, D] block inputs, h [N, F] neuron activations, groups: shared [S·w], routed [E, w].
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from deepseemoe.errors import DeepSeeMoEError

ROUTER_SPREAD = 1e-3  # std of the fitted router's logits over calibration tokens (see the docstring)
MIN_CALIBRATION_TOKENS = 256
DOC_CHARS = 1200  # characters of each calibration / held-out document used
SPLITS = ("clustered", "random")
ROUTERS = ("fitted", "analytic")


@dataclass
class CarveSpec:
    experts: int = 16  # equal parts of each carved layer's neurons (shared ones included)
    shared: int = 1  # parts that form the always-on shared expert (0: none)
    top_k: int = 8  # routed experts per token
    layers: list[int] | None = None  # the layers carved (default: all); the others stay dense
    split: str = "clustered"  # or "random", the control
    router: str = "fitted"  # least squares on the experts' output norms, or "analytic" (CMoE's central neuron)
    seed: int = 0
    kmeans_iters: int = 20

    @property
    def routed(self) -> int:
        return self.experts - self.shared

    def check(self, num_layers: int | None = None, neurons: int | None = None) -> None:
        """The choices among themselves; with the model's layer count and feed-forward width, against
        the model too."""
        if self.split not in SPLITS:
            raise DeepSeeMoEError(f"unknown split {self.split!r}; choose from {', '.join(SPLITS)}")
        if self.router not in ROUTERS:
            raise DeepSeeMoEError(f"unknown router {self.router!r}; choose from {', '.join(ROUTERS)}")
        if neurons is not None and (self.experts < 2 or neurons % self.experts):
            raise DeepSeeMoEError(f"the feed-forward width {neurons} is not divisible into {self.experts} equal experts; "
                                  f"choose --experts among {[d for d in range(2, 129) if neurons % d == 0]}")
        if not 0 <= self.shared < self.experts - 1:
            raise DeepSeeMoEError(f"--shared {self.shared} leaves fewer than 2 routed experts of {self.experts}; "
                                  f"choose 0..{self.experts - 2}")
        if not 1 <= self.top_k <= self.routed:
            raise DeepSeeMoEError(f"--top-k {self.top_k} must be between 1 and the {self.routed} routed experts")
        if num_layers is None:
            return
        bad = [la for la in self.layers or [] if not 0 <= la < num_layers]
        if bad:
            raise DeepSeeMoEError(f"layers {bad} do not exist; the model has layers 0..{num_layers - 1}")


@dataclass
class LayerCarve:
    shared: np.ndarray  # [S·w] neuron ids of the shared expert
    routed: np.ndarray  # [E, w] neuron ids of each routed expert
    router: np.ndarray  # [E, D] fitted router weight, tempered to logits of std ROUTER_SPREAD
    recall: float  # calibration: share of each token's true top-k experts the router picks


@dataclass
class Carve:
    spec: CarveSpec
    layers: dict[int, LayerCarve]
    calibration_tokens: int


def swiglu_mlps(model) -> list:
    """The SwiGLU blocks (gate_proj, up_proj, down_proj, SiLU, no bias) of a Llama-shaped model,
    one per layer; a model of another shape is refused with one line."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise DeepSeeMoEError(f"{type(model).__name__} has no model.layers; carving needs a Llama-shaped dense model "
                              "(LlamaForCausalLM)")
    mlps = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        parts = [getattr(mlp, a, None) for a in ("gate_proj", "up_proj", "down_proj")]
        if mlp is None or any(p is None for p in parts) or getattr(mlp, "experts", None) is not None:
            raise DeepSeeMoEError(f"layer {i} of {type(model).__name__} has no SwiGLU block (mlp.gate_proj/up_proj/"
                                  "down_proj); carving needs a dense Llama-shaped model")
        if any(getattr(p, "bias", None) is not None for p in parts):
            raise DeepSeeMoEError(f"layer {i}'s feed-forward block has biases; the MoE it would be carved into has none")
        act = getattr(model.config, "hidden_act", "silu")
        if act != "silu":
            raise DeepSeeMoEError(f"the feed-forward activation is {act!r}; the carved MoE (Qwen2-MoE) computes SiLU")
        mlps.append(mlp)
    return mlps


@contextmanager
def block_inputs(model, layers: list[int], batches) -> Iterator[dict]:
    """While open, the forwards of `model` on `batches` (run by the caller, in order, each once) record
    the feed-forward blocks' inputs; on close the dict holds, per layer, x [N, D] on the batches'
    real (unpadded) tokens. The caller's pass can be one it needs anyway (the dense model's CE)."""
    import torch

    mlps = swiglu_mlps(model)
    got: dict[int, list] = {la: [] for la in layers}

    def hook(layer):
        def fn(module, args):
            got[layer].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        return fn

    xs: dict = {}
    handles = [mlps[la].register_forward_pre_hook(hook(la)) for la in layers]
    try:
        yield xs
    finally:
        for h in handles:
            h.remove()
    keep = torch.cat([b.attention_mask.reshape(-1).bool() for b in batches])
    xs.update({la: torch.cat(chunks)[keep].float() for la, chunks in got.items()})


def forward_all(model, batches) -> None:
    import torch

    with torch.no_grad():
        for b in batches:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)


def neuron_acts(mlp, x):
    """h = silu(gate x) ⊙ up x [N, F]: what the down projection reads."""
    import torch

    with torch.no_grad():
        return torch.nn.functional.silu(x @ mlp.gate_proj.weight.float().T) * (x @ mlp.up_proj.weight.float().T)


def balanced_kmeans(features: np.ndarray, k: int, size: int, rng: np.random.Generator, iters: int) -> np.ndarray:
    """[k, size] rows of `features` (unit rows, cosine similarity) in k clusters of exactly `size`:
    k-means++ seeds, then rounds of greedy balanced assignment (the most similar (row, centroid)
    pairs first, a centroid taking rows until full) and centroid updates, until nothing moves."""
    n = len(features)
    assert n == k * size
    centroids = [features[rng.integers(n)]]
    for _ in range(1, k):  # k-means++: far from the seeds so far
        d = 1 - np.max(np.stack(centroids) @ features.T, axis=0)
        d = np.clip(d, 0, None) ** 2
        centroids.append(features[rng.choice(n, p=d / d.sum()) if d.sum() > 0 else rng.integers(n)])
    c = np.stack(centroids)
    assign = None
    for _ in range(iters):
        sim = features @ c.T  # [n, k]
        order = np.argsort(-sim, axis=None, kind="stable")
        new = np.full(n, -1)
        room = np.full(k, size)
        left = n
        for flat in order:
            i, j = divmod(int(flat), k)
            if new[i] < 0 and room[j] > 0:
                new[i] = j
                room[j] -= 1
                left -= 1
                if not left:
                    break
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            m = features[assign == j].mean(0)
            c[j] = m / (np.linalg.norm(m) or 1.0)
    return np.stack([np.sort(np.nonzero(assign == j)[0]) for j in range(k)])


def central_neurons(profile: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """[E] per expert, its most central neuron (CMoE's representative): the one of its neurons
    `groups[e]` whose unit activation profile has the largest cosine with the expert's mean profile."""
    out = []
    for g in groups:
        mean = profile[g].mean(0)
        out.append(int(g[int(np.argmax(profile[g] @ (mean / (np.linalg.norm(mean) or 1.0))))]))
    return np.asarray(out)


def expert_outputs(mlp, h, groups: np.ndarray):
    """down_e · h_e [N, E, D]: what each routed expert (its neurons `groups[e]`) adds to each token's
    block output; their norms are what the router learns to rank."""
    import torch

    down = mlp.down_proj.weight.float()
    with torch.no_grad():
        return torch.stack([h[:, g] @ down[:, g].T for g in torch.as_tensor(groups)], 1)


def fit_router(x, target, ridge: float = 1e-3):
    """W [E, D] minimising ‖x Wᵀ − target‖² + ridge·tr(XᵀX)/D·‖W‖² (target centred per token: top-k
    does not see a shift shared by all experts)."""
    import torch

    t = target - target.mean(1, keepdim=True)
    xtx = x.T @ x
    lam = ridge * xtx.diagonal().mean()
    w = torch.linalg.solve(xtx + lam * torch.eye(len(xtx), dtype=x.dtype), x.T @ t)
    return w.T.contiguous()


def recall_at_k(scores, truth, k: int) -> float:
    """Share of each token's true top-k (by `truth`) that the top-k by `scores` picks."""
    import torch

    pick = torch.zeros_like(truth, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
    true = torch.zeros_like(truth, dtype=torch.bool).scatter_(1, truth.topk(k, dim=1).indices, True)
    return float((pick & true).sum() / true.sum())


def carve_layers(model, batches, spec: CarveSpec, progress: bool = False) -> Carve:
    """The split and router of every carved layer, from calibration batches."""
    import torch

    mlps = swiglu_mlps(model)
    F = mlps[0].down_proj.weight.shape[1]
    spec.check(len(mlps), F)
    layers = sorted(spec.layers) if spec.layers else list(range(len(mlps)))
    with block_inputs(model, layers, batches) as xs:
        forward_all(model, batches)
    n = len(next(iter(xs.values())))
    if n < MIN_CALIBRATION_TOKENS:
        raise DeepSeeMoEError(f"{n} calibration tokens are too few to carve (at least {MIN_CALIBRATION_TOKENS}); "
                              "give more text or raise --calibration-tokens")
    w = F // spec.experts
    rng = np.random.default_rng(spec.seed)
    out: dict[int, LayerCarve] = {}
    from deepseemoe.progress import track

    for layer in track(layers, "carving layers", disable=not progress, unit="layers"):
        mlp, x = mlps[layer], xs[layer]
        h = neuron_acts(mlp, x)
        m = (spec.shared + spec.top_k) * w  # neurons a token keeps in the carved model
        marks = torch.zeros_like(h, dtype=torch.bool).scatter_(1, h.abs().topk(m, dim=1).indices, True)
        activity = marks.float().mean(0).numpy()
        order = np.lexsort((np.arange(F), -activity))  # most active first; ties by neuron id
        shared = np.sort(order[: spec.shared * w])
        rest = np.sort(order[spec.shared * w:])
        profile = h.abs().T.numpy().astype(np.float64)  # [neurons, N]: each neuron's activation profile
        profile /= np.clip(np.linalg.norm(profile, axis=1, keepdims=True), 1e-12, None)
        if spec.split == "random":
            routed = np.sort(rng.permutation(rest).reshape(spec.routed, w), axis=1)
        else:
            routed = rest[balanced_kmeans(profile[rest], spec.routed, w, rng, spec.kmeans_iters)]
        routed = routed[np.argsort(routed[:, 0])]  # experts in order of their first neuron: deterministic labels
        norms = expert_outputs(mlp, h, routed).norm(dim=-1)
        if spec.router == "analytic":
            router = mlp.gate_proj.weight.detach().float()[torch.as_tensor(central_neurons(profile, routed))]
        else:
            router = fit_router(x.double(), norms.double()).float()
        logits = x @ router.T
        spread = float(logits.std()) or 1.0  # tempered: selected experts weigh 1 ± ~0.3 % (docstring)
        out[layer] = LayerCarve(shared, routed, (router * (ROUTER_SPREAD / spread)).numpy(),
                                recall_at_k(logits, norms, spec.top_k))
    return Carve(spec, out, n)


def moe_config(dense_config, spec: CarveSpec, carved: list[int]):
    """The Qwen2-MoE config that holds the dense model with `carved` layers as MoE blocks."""
    from transformers import Qwen2MoeConfig

    c = dense_config
    F = c.intermediate_size
    w = F // spec.experts
    return Qwen2MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=F, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hidden_act="silu", max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, rope_parameters=dict(c.rope_parameters),
        use_sliding_window=False, decoder_sparse_step=1, moe_intermediate_size=w,
        shared_expert_intermediate_size=max(spec.shared * w, 1), num_experts_per_tok=spec.top_k,
        num_experts=spec.routed, norm_topk_prob=False, qkv_bias=False,
        mlp_only_layers=[i for i in range(c.num_hidden_layers) if i not in carved],
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
    )


def build_moe(dense, carve: Carve):
    """The Qwen2MoeForCausalLM that computes `dense` with the carved layers as MoE blocks."""
    import torch
    from transformers import Qwen2MoeForCausalLM

    spec = carve.spec
    if getattr(dense.config, "attention_bias", False):
        raise DeepSeeMoEError("the dense model's attention has biases; Qwen2-MoE without q/k/v bias cannot hold it")
    config = moe_config(dense.config, spec, sorted(carve.layers))
    torch.manual_seed(spec.seed)
    moe = Qwen2MoeForCausalLM(config).float().eval()
    src = dense.state_dict()
    state = {k: v for k, v in src.items() if ".mlp." not in k}
    E = spec.routed
    for i, mlp in enumerate(swiglu_mlps(dense)):
        prefix = f"model.layers.{i}.mlp."
        gate, up, down = (getattr(mlp, a).weight.detach().float() for a in ("gate_proj", "up_proj", "down_proj"))
        if i not in carve.layers:
            state.update({prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up,
                          prefix + "down_proj.weight": down})
            continue
        lc = carve.layers[i]
        routed = torch.as_tensor(lc.routed)
        state[prefix + "experts.gate_up_proj"] = torch.cat([gate[routed], up[routed]], dim=1)  # [E, 2w, D]
        state[prefix + "experts.down_proj"] = E * down[:, routed].permute(1, 0, 2)  # [E, D, w]: weight 1/E each
        state[prefix + "gate.weight"] = torch.as_tensor(lc.router)
        s = torch.as_tensor(lc.shared)
        if len(s):
            state.update({prefix + "shared_expert.gate_proj.weight": gate[s], prefix + "shared_expert.up_proj.weight": up[s],
                          prefix + "shared_expert.down_proj.weight": 2 * down[:, s]})  # sigmoid(0) = 1/2
        else:  # no shared expert: a zero one (width 1)
            state.update({prefix + "shared_expert.gate_proj.weight": torch.zeros_like(gate[:1]),
                          prefix + "shared_expert.up_proj.weight": torch.zeros_like(up[:1]),
                          prefix + "shared_expert.down_proj.weight": torch.zeros_like(down[:, :1])})
        state[prefix + "shared_expert_gate.weight"] = torch.zeros(1, gate.shape[1])
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise DeepSeeMoEError(f"the carved model does not match Qwen2-MoE's layout (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); this transformers version changed it")
    if config.tie_word_embeddings:
        moe.tie_weights()
    return moe


def carve_summary(carve: Carve) -> dict:
    return {"spec": asdict(carve.spec), "calibration_tokens": carve.calibration_tokens,
            "layers": {str(la): {"shared": lc.shared.tolist(), "routed": lc.routed.tolist(),
                                 "router_recall_calibration": lc.recall} for la, lc in carve.layers.items()}}


def domain_ce(model, batches) -> dict[str, float]:
    """Next-token CE (nats/token) per domain and overall ("all"), over predictions within a
    document (`data.tokens.counted_predictions`, as `interventions.loss.LossMeter` counts them)."""
    import torch

    from deepseemoe.data.tokens import counted_predictions, token_domains

    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b.input_ids[:, 1:].flatten(),
                                                   reduction="none")
            valid = counted_predictions(b).flatten()
            for d, c, ok in zip(token_domains(b), ce.tolist(), valid.tolist(), strict=True):
                for key in {d or "all", "all"} if ok else ():
                    sums[key] = sums.get(key, 0.0) + c
                    counts[key] = counts.get(key, 0) + 1
    return {d: sums[d] / counts[d] for d in sorted(sums)}


def heldout_router_quality(dense, carve: Carve, xs: dict, ks: list[int]) -> dict[str, dict]:
    """Per carved layer, on held-out text and the dense model's own block inputs `xs` (so each layer
    is judged alone): the router's recall of each token's true top-k experts (by output norm) and the
    relative error ‖y_dense − y_carved‖ / ‖y_dense‖ of the block output at each k."""
    import torch

    mlps = swiglu_mlps(dense)
    out = {}
    for layer, lc in carve.layers.items():
        mlp, x = mlps[layer], xs[layer]
        h = neuron_acts(mlp, x)
        down = mlp.down_proj.weight.float()
        with torch.no_grad():
            full = h @ down.T
            parts = expert_outputs(mlp, h, lc.routed)  # [N, E, D]
            shared = h[:, lc.shared] @ down[:, lc.shared].T if len(lc.shared) else torch.zeros_like(full)
            norms = parts.norm(dim=-1)
            logits = x @ torch.as_tensor(lc.router).T
            row = {}
            for k in ks:
                pick = logits.topk(k, dim=1).indices
                kept = shared + parts.gather(1, pick[:, :, None].expand(-1, -1, parts.shape[-1])).sum(1)
                row[str(k)] = {"recall": recall_at_k(logits, norms, k),
                               "relative_error": float((full - kept).norm() / full.norm())}
        out[str(layer)] = row
    return out


def router_mean(report: dict, measure: str) -> dict[str, float]:
    """Per measured k, a carve report's `heldout_router_quality` measure ("recall" or
    "relative_error") averaged over its carved layers."""
    layers = list(report["router"].values())
    return {k: sum(layer[k][measure] for layer in layers) / len(layers) for k in layers[0]}


@dataclass
class CarvedModel:
    root: Path  # the cache entry (or --out): moe/ and report.json
    moe_dir: Path  # the carved Qwen2MoeForCausalLM folder
    dense_dir: Path  # its dense twin: the model it was carved from
    report: dict
    cached: bool


def carve_zoo(corpus_dir: str | Path, *, model: str | Path | None = None, spec: CarveSpec | None = None,
              out: str | Path | None = None, cache_dir: str | Path | None = None, calibration_tokens: int = 8192,
              eval_tokens: int = 4096, ctx_len: int = 256, eval_ks: list[int] | None = None, recarve: bool = False,
              progress: bool = True) -> CarvedModel:
    """Carve `model` (default SmolLM2-135M-Instruct) on the corpus's train.jsonl, measure it on its
    val.jsonl against the dense model, save it whole (`moe/` + report.json) under `out` or the
    zoo cache (keyed by the model's weights, the corpus, the settings and the code)."""
    import resource

    import torch

    from deepseemoe.data.sources import TextSource, iter_documents
    from deepseemoe.data.tokens import pack_documents
    from deepseemoe.models.load import load_model
    from deepseemoe.models.smollm2 import smollm2_folder
    from deepseemoe.runs import stamp
    from deepseemoe.runs.atomic import atomic_write_json, read_json
    from deepseemoe.runs.lock import atomic_dir
    from deepseemoe.zoo.train import default_cache_dir

    spec = spec or CarveSpec()
    spec.check()  # what needs no model: refused before anything is loaded
    ks = sorted(set(eval_ks or [spec.top_k, max(1, spec.routed // 4), spec.routed // 2, (3 * spec.routed) // 4,
                                  spec.routed]))
    bad = [k for k in ks if not 1 <= k <= spec.routed]
    if bad:
        raise DeepSeeMoEError(f"--eval-k {bad}: each k must be between 1 and the {spec.routed} routed experts")
    corpus_dir = Path(corpus_dir)
    for name in ("train.jsonl", "val.jsonl"):
        if not (corpus_dir / name).is_file():
            raise DeepSeeMoEError(f"{corpus_dir} has no {name}; build a corpus with `deepseemoe corpus build` "
                                  "(calibration text from train.jsonl, held-out text from val.jsonl)")
    dense_dir = Path(model).expanduser() if model else smollm2_folder(Path(cache_dir or default_cache_dir()))
    if not (dense_dir / "config.json").is_file():
        raise DeepSeeMoEError(f"{dense_dir} is not a model folder (no config.json); give a dense Llama-shaped model "
                              "saved with save_pretrained")
    settings = asdict(spec)
    if settings["router"] == "fitted":  # the key of a carve made before `router` existed: still cached
        del settings["router"]
    key = stamp.digest(stage="carve", spec=settings, model=stamp.model_digest(dense_dir),
                       train=stamp.file_digest(corpus_dir / "train.jsonl"),
                       val=stamp.file_digest(corpus_dir / "val.jsonl"), calibration_tokens=calibration_tokens,
                       eval_tokens=eval_tokens, ctx_len=ctx_len, eval_ks=eval_ks)
    root = Path(out) if out else Path(cache_dir or default_cache_dir()) / "zoo" / f"carved-{key[:16]}"
    if (root / "report.json").exists() and not recarve:
        report = read_json(root / "report.json", f"delete {root} (or pass --recarve) to carve again")
        if report.get("key") == key:
            return CarvedModel(root, root / "moe", Path(report["dense"]), report, cached=True)
    if out and root.exists() and any(root.iterdir()) and not (root / "report.json").exists():
        raise DeepSeeMoEError(f"{root} exists and is not a carved model; give an empty or new --out")

    start = time.perf_counter()
    handle = load_model(str(dense_dir))
    dense, tok = handle.model.float().eval(), handle.require_tokenizer()
    swiglu_mlps(dense)  # refused before any text is read

    def batches(name: str, tokens: int) -> list:
        # documents in turn from each domain, and each one's first DOC_CHARS characters: a few thousand
        # tokens then span every domain about equally, not the first few long documents
        source = TextSource(str(corpus_dir / name), domain_field="domain", interleave_domains=True)
        docs = (replace(d, text=d.text[:DOC_CHARS]) for d in iter_documents(source))
        return list(pack_documents(tok, docs, ctx_len=handle.check_ctx_len(ctx_len), batch_size=8, max_tokens=tokens))

    calibration, heldout = batches("train.jsonl", calibration_tokens), batches("val.jsonl", eval_tokens)
    torch.manual_seed(spec.seed)
    carve = carve_layers(dense, calibration, spec, progress=progress)
    moe = build_moe(dense, carve)
    carve_seconds = time.perf_counter() - start
    gates = [layer.mlp.gate for layer in moe.model.layers if hasattr(layer.mlp, "gate")]
    with block_inputs(dense, sorted(carve.layers), heldout) as heldout_x:  # one dense pass: its CE and block inputs
        dense_ce = domain_ce(dense, heldout)
    carved_ce = {}
    for k in ks:
        for g in gates:
            g.top_k = k
        carved_ce[str(k)] = domain_ce(moe, heldout)
    for g in gates:
        g.top_k = spec.top_k
    quality = heldout_router_quality(dense, carve, heldout_x, ks)
    report = {"key": key, "dense": str(dense_dir), "class": "Qwen2MoeForCausalLM", **carve_summary(carve),
              "carve_seconds": round(carve_seconds, 1), "heldout_tokens": sum(b.num_tokens for b in heldout),
              "ce": {"dense": dense_ce, "carved": carved_ce}, "router": quality,
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
              "seconds": round(time.perf_counter() - start, 1)}

    def write(tmp: Path) -> None:
        moe.save_pretrained(tmp / "moe")
        tok.save_pretrained(tmp / "moe")
        atomic_write_json(tmp / "report.json", report)

    atomic_dir(root, write)
    return CarvedModel(root, root / "moe", dense_dir, report, cached=False)
