"""Hugging Face transformers integration: run the MoE blocks of a loaded model on ``FusedMoE``.

    import moe.hf
    names = moe.hf.replace_moe_blocks(model)              # every sparse-MoE block, in place
    model.set_experts_implementation("moe")               # or: only the experts, via transformers

Needs transformers 5 or later (``pip install 'moe-layer[hf]'``).
"""

from __future__ import annotations

try:
    import transformers as _transformers
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("moe.hf needs transformers>=5: pip install 'moe-layer[hf]'") from e

if int(_transformers.__version__.split(".")[0]) < 5:  # pragma: no cover
    raise ImportError(f"moe.hf needs transformers>=5, found {_transformers.__version__}")

from .families import FAMILIES, Family, supported_block_classes
from .interface import register_experts_implementation
from .replace import MoEBlock, MoEExperts, replace_moe_blocks

register_experts_implementation("moe")

__all__ = [
    "FAMILIES",
    "Family",
    "MoEBlock",
    "MoEExperts",
    "register_experts_implementation",
    "replace_moe_blocks",
    "supported_block_classes",
]
