"""Print README's "Supported architectures" section from the registry and the installed transformers.

    .venv/bin/python scripts/arch_table.py
"""

from deepseemoe.models.registry import UNSUPPORTED_MODEL_TYPES
from deepseemoe.models.tiny import moe_model_types

types = moe_model_types()
supported = [t for t in types if t not in UNSUPPORTED_MODEL_TYPES]
print(f"Checked on every MoE text architecture of the installed transformers ({len(types)} model types; "
      f"multimodal composites are covered through their `*_text` model): **{len(supported)} supported**, "
      f"{len(types) - len(supported)} not.\n")
print("Supported: " + ", ".join(f"`{t}`" for t in supported) + ".\n")
print("| not supported | reason |\n|---|---|")
for t in types:
    if t in UNSUPPORTED_MODEL_TYPES:
        print(f"| `{t}` | {UNSUPPORTED_MODEL_TYPES[t]} |")
