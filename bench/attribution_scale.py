"""Benchmark: attribution graphs (`deepseemoe attribute`) — against circuit-tracer on the same work, and
at real MoE dimensions.

    python bench/attribution_scale.py                       # both parts
    python bench/attribution_scale.py --part peer --tokens 64
    python bench/attribution_scale.py --part scale --layers 2 --tokens 16 --latents 16384 --k 64

peer: a tiny random OLMoE with a random skip transcoder replacing every MoE block, loaded by
circuit-tracer's own code into its ReplacementModel (TransformerLens backend); both tools build the
full graph of the same prompt (every active feature a node, its defaults otherwise: circuit-tracer's
`attribute` with max_feature_nodes=None, our `build_graph`). The edges are equal
(tests/attribution/test_against_circuit_tracer.py): the ratio is for the same graph.

scale: a synthetic model of OLMoE-1B-7B's shape (d 2048, 64 experts of 1,024 neurons, top-8, 16
heads, vocabulary 50,304; random weights, fewer layers) with a TopK SAE (`--latents`, `--k`) on the
last layer's block input: nodes by kind, seconds, target nodes per second, peak resident memory and
the dense adjacency's size, and the N × N memory that 16 layers would need at this prompt length.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def peer(tokens: int) -> None:
    import yaml
    from huggingface_hub import constants as hub_constants

    # circuit-tracer reads a constant huggingface_hub 1.0 removed (as tests/conftest.py notes)
    if not hasattr(hub_constants, "HF_HUB_ENABLE_HF_TRANSFER"):
        hub_constants.HF_HUB_ENABLE_HF_TRANSFER = False
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.transcoder import load_transcoder_set
    from transformer_lens import loading_from_pretrained

    from deepseemoe.attribution.graph import build_graph
    from deepseemoe.dictionaries.coder import CoderConfig, build_coder
    from deepseemoe.dictionaries.formats import save_circuit_tracer
    from deepseemoe.models.load import load_model
    from deepseemoe.models.tiny import tiny_model, tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        tok = tiny_tokenizer()
        tok.save_pretrained(folder)
        tiny_model("olmoe", vocab_size=len(tok), bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id).save_pretrained(folder)
        handle = load_model(str(folder))
        D = handle.model.config.hidden_size
        coders = {}
        for layer in range(handle.num_layers):
            torch.manual_seed(10 + layer)
            coder = build_coder(CoderConfig(d_in=D, d_out=D, n_latents=48, activation="jumprelu", skip=True))
            with torch.no_grad():
                for p in coder.parameters():
                    p.normal_(0, 0.3)
                coder.log_threshold.fill_(-2.0)
            coders[layer] = coder.eval()
        exported = save_circuit_tracer(coders, Path(tmp) / "set", model_name="")
        config = yaml.safe_load((exported / "config.yaml").read_text())
        transcoders = load_transcoder_set({i: str(exported / n) for i, n in enumerate(config["transcoders"])},
                                          scan="bench", feature_input_hook=config["feature_input_hook"],
                                          feature_output_hook=config["feature_output_hook"],
                                          device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False)
        loading_from_pretrained.get_official_model_name = lambda name: name  # a local folder, not a hub name
        rm = ReplacementModel.from_pretrained_and_transcoders(str(folder), transcoders, backend="transformerlens",
                                                              hf_model=handle.model, tokenizer=handle.tokenizer,
                                                              device=torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, len(tok), (tokens,), generator=g)
        ids[0] = tok.bos_token_id
        meta = lambda la: {"kind": "skip_transcoder", "source": [["block_in", la]],  # noqa: E731
                           "target": [["block_out", la]]}
        ours_dicts = {f"tc{la}": (c, meta(la)) for la, c in coders.items()}
        build_graph(handle, ids[:8], ours_dicts)  # warm both once
        attribute(ids[None, :8], rm, max_n_logits=5, batch_size=64, max_feature_nodes=None, verbose=False)
        t = time.perf_counter()
        ours = build_graph(handle, ids, ours_dicts, max_logits=5, logit_coverage=0.95, batch_size=64)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        theirs = attribute(ids[None], rm, max_n_logits=5, desired_logit_prob=0.95, batch_size=64,
                           max_feature_nodes=None, verbose=False)
        t_theirs = time.perf_counter() - t
        print(f"peer: tiny OLMoE, a skip transcoder on each of {handle.num_layers} blocks, {tokens} tokens")
        print(f"  deepseemoe   {len(ours.nodes):6d} nodes  {t_ours:7.2f} s")
        print(f"  circuit-tracer {theirs.adjacency_matrix.shape[0]:4d} nodes  {t_theirs:7.2f} s")
        print(f"  ratio (circuit-tracer / deepseemoe): {t_theirs / t_ours:.2f}x")


def scale(layers: int, tokens: int, latents: int, k: int, batch_size: int, max_nodes: int | None = None) -> None:
    from deepseemoe.attribution.graph import build_graph, prune
    from deepseemoe.dictionaries.coder import CoderConfig, build_coder
    from deepseemoe.models.load import handle_from_model
    from deepseemoe.models.tiny import tiny_model

    torch.manual_seed(0)
    model = tiny_model("olmoe", num_hidden_layers=layers, hidden_size=2048, intermediate_size=1024, num_experts=64,
                       num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=16, vocab_size=50304)
    handle = handle_from_model(model.eval())
    sae = build_coder(CoderConfig(d_in=2048, n_latents=latents, activation="topk", k=k))
    with torch.no_grad():
        sae.W_dec.normal_(0, 2048 ** -0.5)
        sae.W_enc.copy_(sae.W_dec.T)
    last = layers - 1
    dicts = {"sae": (sae.eval(), {"kind": "sae", "source": [["block_in", last]], "target": [["block_in", last]]})}
    ids = torch.randint(3, 50304, (tokens,), generator=torch.Generator().manual_seed(0))
    before = _rss_gb()
    t = time.perf_counter()
    graph = build_graph(handle, ids, dicts, batch_size=batch_size, max_targets=max_nodes, progress=True)
    built = time.perf_counter() - t
    t = time.perf_counter()
    prune(graph)
    pruned = time.perf_counter() - t
    N = len(graph.nodes)
    kinds = {kind: len(graph.of_kind(kind)) for kind in ("token", "feature", "error", "router", "expert", "logit")}
    targets = N - kinds["token"] - kinds["error"]
    per_layer = 2 * tokens * 8 + tokens  # router + expert nodes, and an error node, per MoE layer
    full = 16 * per_layer + tokens * k + tokens + 5
    print(f"scale: OLMoE-1B-7B shape (d 2048, 64 experts × 1,024, top-8), {layers} layers, {tokens} tokens, "
          f"SAE {latents:,} latents k={k} on layer {last}")
    print("  nodes: " + ", ".join(f"{kind} {n:,}" for kind, n in kinds.items()) + f" — {N:,} in all")
    print(f"  built in {built:.1f} s ({targets / built:.0f} target nodes/s), pruned in {pruned:.2f} s, kept "
          f"{graph.summary['kept_nodes']:,} nodes, {graph.summary['kept_influence']:.0%} of the influence")
    print(f"  peak resident memory {_rss_gb():.1f} GB (model loaded: {before:.1f} GB); adjacency "
          f"{N * N * 4 / 2**30:.2f} GB")
    if max_nodes is not None:
        b = graph.summary.get("bounded")
        print(f"  bounded by --max-nodes {max_nodes:,}: " + (f"{b['expanded']:,} of {b['targets']:,} targets expanded, "
                                                             f"{b['nodes_before']:,} → {b['nodes']:,} nodes"
                                                             if b else "the bound is above every target"))
    print(f"  16 layers at {tokens} tokens would have ~{full:,} nodes: a dense adjacency of "
          f"{full * full * 4 / 2**30:.1f} GB unbounded; with --max-nodes M the rows computed take M × that many "
          f"× 4 bytes ({(max_nodes or 8192) * full * 4 / 2**30:.1f} GB at M = {max_nodes or 8192:,})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("peer", "scale", "both"), default="both")
    ap.add_argument("--tokens", type=int, default=16, help="prompt length of the scale part")
    ap.add_argument("--peer-tokens", type=int, default=64, help="prompt length of the peer part")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--latents", type=int, default=16384)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-nodes", type=int, default=None, help="bound the scale part's graph (attribute --max-nodes)")
    args = ap.parse_args()
    torch.set_grad_enabled(True)
    if args.part in ("peer", "both"):
        peer(args.peer_tokens)
    if args.part in ("scale", "both"):
        scale(args.layers, args.tokens, args.latents, args.k, args.batch_size, args.max_nodes)


if __name__ == "__main__":
    main()
