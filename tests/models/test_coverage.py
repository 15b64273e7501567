"""Every MoE architecture of the installed transformers: built tiny, checked numerically (fp32).

Independent references, per architecture:
  (a) the experts module's own output and the block's own output (test hooks) against
      Σ_k w_k·E_k(x) from our recomputation (+ the shared part computed by calling the shared
      modules directly);
  (b) Hugging Face's `output_router_logits`;
  (c) the decoder layers' own outputs/inputs (test hooks), out[l] == in[l+1];
  (d) the experts module's call arguments, read by a test hook that is not ours;
  plus: a router family's selector reproduces the router's own (idx, weights).
The enumeration comes from transformers itself, so a new release's MoE architectures show up
here as failures until they are handled.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.load import handle_from_model
from deepseemoe.models.registry import UNSUPPORTED_MODEL_TYPES
from deepseemoe.models.tiny import moe_model_types, tiny_model

warnings.filterwarnings("ignore")

UNSUPPORTED_TYPES = UNSUPPORTED_MODEL_TYPES
# Router outputs that are not raw logits over the routed experts, so (b) compares differently.
HF_LOGITS_EXCEPTIONS = {
    "gemma4_text": "records softmax probabilities, not logits",
    "zaya": "E+1 classes (a skip class)",
    "longcat_flash": "E + zero_expert_num classes",
    "deepseek_v4": "output_router_logits raises IndexError upstream when layers hash-route",
}
# Blocks whose output is not routed (+ shared): a post-map is applied after the experts.
BLOCK_POST_MAPS = {"axk1", "muse_spark_text", "openai_privacy_filter"}

ALL_TYPES = moe_model_types()


def test_enumeration_finds_the_known_architectures():
    for known in ("mixtral", "olmoe", "qwen3_moe", "deepseek_v3", "gpt_oss", "qwen2_moe", "deepseek_v2"):
        assert known in ALL_TYPES
    assert len(ALL_TYPES) >= 50  # 53 text MoE model types in transformers 5.17, 59 in 5.23


@pytest.mark.parametrize("model_type", [t for t in ALL_TYPES if t in UNSUPPORTED_TYPES])
def test_unsupported_architectures_fail_loudly(model_type):
    try:
        model = tiny_model(model_type)
    except ValueError as exc:  # not a causal LM: AutoModelForCausalLM refuses the config
        assert "Unrecognized configuration class" in str(exc)
        return
    if model_type == "doge":
        handle = handle_from_model(model)
        assert not handle.is_moe  # no hookable experts: treated as dense, never as a routed MoE
        return
    with pytest.raises(DeepSeeMoEError, match="unsupported MoE architecture"):  # never silently skipped
        handle_from_model(model)


def _shared_output(block, x):
    """The shared-expert part of the block, computed by calling its modules directly."""
    for name in ("shared_experts", "shared_expert", "shared_mlp"):
        shared = getattr(block, name, None)
        if isinstance(shared, torch.nn.Module):
            out = shared(x)
            gate = getattr(block, "shared_expert_gate", None)
            if gate is not None:
                out = torch.sigmoid(gate(x)) * out
            return out
    return torch.zeros_like(x)


@pytest.mark.parametrize("model_type", [t for t in ALL_TYPES if t not in UNSUPPORTED_TYPES])
def test_capture_adds_up(model_type):
    torch.manual_seed(0)
    model = tiny_model(model_type)
    handle = handle_from_model(model)
    assert handle.is_moe, f"{model_type}: no MoE layer found"

    events, experts_args, experts_out, block_io, layer_in, layer_out = {}, {}, {}, {}, {}, {}
    hooks = []
    for layer_idx, moe in handle.moe_layers.items():
        hooks += moe.adapter.observe(moe, lambda ev, i=layer_idx: events.__setitem__(i, ev))

        def ex_hook(mod, args, kwargs, out, i=layer_idx):  # reference (d): not our unpacking code
            experts_args[i] = (args, kwargs)
            experts_out[i] = out

        hooks.append(moe.experts.register_forward_hook(ex_hook, with_kwargs=True))

        def block_hook(mod, args, kwargs, out, i=layer_idx):
            x = args[0] if args else kwargs["hidden_states"]
            block_io[i] = (x, out[0] if isinstance(out, tuple) else out)

        hooks.append(moe.block.register_forward_hook(block_hook, with_kwargs=True))
    for i, layer in enumerate(handle.layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: layer_in.__setitem__(i, a[0] if a else k["hidden_states"]), with_kwargs=True))
        hooks.append(layer.register_forward_hook(
            lambda m, a, o, i=i: layer_out.__setitem__(i, o[0] if isinstance(o, tuple) else o)))

    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        try:
            out = model(input_ids=ids, output_router_logits=True)
        except (TypeError, IndexError):
            out = model(input_ids=ids)
    for h in hooks:
        h.remove()

    # (c) residual chain
    for i in range(len(handle.layers) - 1):
        torch.testing.assert_close(layer_out[i], layer_in[i + 1], rtol=0, atol=0)

    for layer_idx, moe in handle.moe_layers.items():
        ev = events[layer_idx]
        args, kwargs = experts_args[layer_idx]
        # (d) idx / weights as the experts module received them
        ref_idx = args[1] if len(args) > 1 else next(v for k, v in kwargs.items() if "ind" in k or "expert" in k)
        ref_w = args[2] if len(args) > 2 else next(v for k, v in kwargs.items() if "weight" in k or "score" in k)
        assert torch.equal(ev.idx, ref_idx)
        assert torch.equal(ev.weights, ref_w)
        # (a) experts level: Σ_k w_k·E_k(x) == the experts module's output
        y = moe.adapter.expert_outputs(moe, ev.x, ev.idx)
        routed = (ev.weights.unsqueeze(-1).to(y.dtype) * y).sum(1)
        ref_out = experts_out[layer_idx]
        ref_out = (ref_out[0] if isinstance(ref_out, tuple) else ref_out).reshape(routed.shape)
        torch.testing.assert_close(routed, ref_out, rtol=1e-5, atol=1e-6)
        # (a) block level: routed + shared == the block's output, where the block adds nothing else
        if moe.combine.removeprefix("scaled_") in ("routed", "routed+shared", "routed+gated_shared") \
                and model_type not in BLOCK_POST_MAPS:
            x_in, b_out = block_io[layer_idx]
            x_in = x_in.reshape(-1, x_in.shape[-1])
            with torch.no_grad():
                expected = routed * moe.routed_scale + _shared_output(moe.block, x_in)
            torch.testing.assert_close(expected, b_out.reshape(expected.shape), rtol=1e-5, atol=1e-6)
        # selector reproduces the router (where the family has one)
        if moe.adapter is not None and not moe.router_family.startswith("other:"):
            sel_idx, sel_w = moe.adapter.select(moe, ev.logits)
            order, sel_order = ev.idx.argsort(-1), sel_idx.argsort(-1)
            assert torch.equal(ev.idx.gather(1, order), sel_idx.gather(1, sel_order))
            torch.testing.assert_close(ev.weights.float().gather(1, order), sel_w.float().gather(1, sel_order))

    # (b) HF's own router logits, one entry per MoE layer in layer order
    hf_logits = getattr(out, "router_logits", None)
    if hf_logits and model_type not in HF_LOGITS_EXCEPTIONS:
        ours = [events[i].logits for i in sorted(handle.moe_layers)]
        assert len(hf_logits) == len(ours)
        for mine, theirs in zip(ours, hf_logits, strict=True):
            torch.testing.assert_close(mine.float(), theirs.reshape(mine.shape).float(), rtol=0, atol=0)


def test_readme_architecture_table_is_current_for_the_pinned_transformers():
    # Independent reference: transformers' own list of MoE model types (ALL_TYPES) and the
    # version pinned in constraints/ci.txt. scripts/upstream_check.sh deselects this test: the
    # README describes the pinned release, not the newest one.
    import importlib.util
    import re
    from pathlib import Path

    import transformers

    root = Path(__file__).parents[2]
    pinned = re.search(r"^transformers==(\S+)$", (root / "constraints" / "ci.txt").read_text(), re.M)
    assert pinned and transformers.__version__ == pinned.group(1), (
        f"transformers {transformers.__version__} is installed but constraints/ci.txt pins "
        f"{pinned and pinned.group(1)}: run bash scripts/setup.sh --test")
    spec = importlib.util.spec_from_file_location("arch_table", root / "scripts" / "arch_table.py")
    arch_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arch_table)
    readme = arch_table.readme_block((root / "README.md").read_text())
    assert readme == arch_table.table(), "README's architecture table is stale: scripts/arch_table.py --write"
    for model_type in ALL_TYPES:
        assert f"`{model_type}`" in readme, model_type
    for model_type, reason in UNSUPPORTED_MODEL_TYPES.items():
        if model_type in ALL_TYPES:
            assert f"| `{model_type}` | {reason} |" in readme, model_type
