"""Ternary weights after the fact: an MoE's experts and router (or a dense model's MLPs) ternarised by
BitNet's absmean rule (`models.ternary`), and the held-out loss that costs per domain."""

from __future__ import annotations

from deepseemoe.data.tokens import token_domains
from deepseemoe.interventions.loss import LossMeter
from deepseemoe.models.handle import ModelHandle
from deepseemoe.models.ternary import ternarize_model, ternary_record


def ternary_study(handle: ModelHandle, parts: tuple[str, ...], per: str, batches: list | None = None) -> dict:
    """Ternarise `parts` of `handle` in place (scale per `per`): ternary.json's record, and with held-out
    `batches` the loss before and after (`loss`)."""
    meter = LossMeter(handle, batches, [token_domains(b) for b in batches]) if batches else None
    tensors = ternarize_model(handle, parts, per)
    result = {"model": handle.name, **ternary_record(parts, per, tensors)}
    if meter is not None:
        result["loss"] = loss_before_after(meter)
    return result


def loss_before_after(meter) -> dict[str, dict[str, float]]:
    """Per domain and over all ('all'): the clean loss `meter` measured and the loss of the model now."""
    after = meter.measure()
    clean = meter.clean_loss()
    out = {d: {"float": clean["by_domain"][d], "ternary": clean["by_domain"][d] + after["by_domain"][d],
               "predictions": clean["predictions"][d]} for d in sorted(after["by_domain"])}
    if out:
        out["all"] = {"float": clean["ce"], "ternary": clean["ce"] + after["delta_ce"],
                      "predictions": sum(v["predictions"] for v in out.values())}
    return out
