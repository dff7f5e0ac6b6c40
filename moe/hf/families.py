"""The family table: for each supported transformers sparse-MoE block, where its router, experts and
shared experts live, how it routes, and how its expert weights map onto ``FusedMoE``'s layout.

Every routing rule here was read off the family's transformers 5 modeling code; the comments name
what each family does that the others do not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ActivationSpec, RoutingConfig
from ..routing import RoutingFunction, stable_topk
from .layout import CheckpointLayout

__all__ = [
    "FAMILIES",
    "ExpertWeights",
    "Family",
    "Routing",
    "activation_from_hf",
    "family_for",
    "standard_weights",
    "supported_block_classes",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# transformers' activation names (config.hidden_act) -> moe's activation table
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


def activation_from_hf(name: str, where: str) -> ActivationSpec:
    """moe's spec for a transformers activation name, or a ValueError naming the ones we map."""
    if name not in _HF_ACTIVATIONS:
        raise ValueError(
            f"{where}: activation {name!r} has no exact counterpart in moe's activation table; "
            f"supported: {', '.join(_HF_ACTIVATIONS)}"
        )
    return ActivationSpec.parse(_HF_ACTIVATIONS[name])


@dataclass(frozen=True)
class ExpertWeights:
    """Expert tensors in FusedMoE's layout: w13 [E, 2N, K] (gate rows then up rows), w2 [E, K, N], and
    the layout they came from; ``layout.shared()`` names the ones that are the original tensors."""

    w13: torch.Tensor
    w2: torch.Tensor
    w13_bias: torch.Tensor | None
    w2_bias: torch.Tensor | None
    layout: CheckpointLayout

    @classmethod
    def read(cls, layout: CheckpointLayout, module: nn.Module) -> ExpertWeights:
        """Read ``module``'s tensors (by ``layout.original_keys()``) into our layout."""
        ours = layout.to_ours({key: _attr(module, key) for key in layout.original_keys()})
        return cls(ours["w13"], ours["w2"], ours["w13_bias"], ours["w2_bias"], layout)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Routing:
    """How a family turns router logits into (weights, ids), in moe's terms.

    ``round_weights``: the family casts its routing weights to the activations' dtype before the
    experts use them (a no-op in fp32, a rounding in bf16), so we do the same.
    ``correction_bias``: the name of the router's buffer holding DeepSeek-V3's score correction bias.
    ``custom``: routing that a ``RoutingConfig`` cannot express (DBRX's p-norm).
    """

    top_k: int
    config: RoutingConfig = field(default_factory=RoutingConfig)
    round_weights: bool = False
    correction_bias: str | None = None
    custom: RoutingFunction | None = None


@dataclass(frozen=True)
class PNormSoftmaxTopk:
    """DBRX: softmax in the logits' dtype, top-k, then divide by the p-norm of the k weights (no
    division when ``p`` is None). Computed in the logits' dtype like DBRX, with moe's tie order."""

    p: float | None

    def __call__(
        self, hidden_states: torch.Tensor, router_logits: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(router_logits, dim=-1, dtype=router_logits.dtype)  # [T, E]
        values, ids = stable_topk(probs, top_k)  # [T, k]
        if self.p is not None:
            values = values / torch.norm(values, p=self.p, dim=-1, keepdim=True)
        return values, ids


@dataclass(frozen=True)
class Family:
    """One supported block class. ``routing``, ``weights`` and ``activation`` read the block (and the
    config of the model that holds it)."""

    name: str
    block_class: str
    experts_class: str
    router_attr: str
    routing: Callable[[nn.Module], Routing]
    weights: Callable[[nn.Module], ExpertWeights]
    activation: Callable[[nn.Module, object], ActivationSpec]
    shared_attr: str | None = None
    shared_gate_attr: str | None = None
    returns_router_scores: bool = False  # gpt-oss returns (hidden_states, router_scores)


# ------------------------------------------------------------------------------------ weights
def _attr(module: nn.Module, dotted: str) -> torch.Tensor:
    for name in dotted.split("."):
        module = getattr(module, name)
    return module  # type: ignore[return-value]


def _reject_layout(experts: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"{type(experts).__name__}: {why}. moe.hf handles transformers' fused experts layout "
        "(3-D gate_up_proj and down_proj parameters, unquantized)"
    )


def standard_weights(experts: nn.Module) -> ExpertWeights:
    """Weights of an experts module in transformers' standard fused layout (``@use_experts_implementation``):
    ``gate_up_proj`` [E, 2N, K] and ``down_proj`` [E, K, N] are shared as they are; transposed
    ([E, K, 2N], [E, N, K]) or interleaved gate/up (gpt-oss) weights are converted once. The flags
    ``is_transposed``, ``is_concatenated`` and ``has_bias`` that transformers' decorator sets say which."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        found = sorted(name for name, _ in experts.named_parameters(recurse=False))
        raise _reject_layout(experts, f"no gate_up_proj/down_proj tensors (found parameters: {found})")
    if not getattr(experts, "has_gate", True):
        raise _reject_layout(experts, "non-gated experts (up_proj only) are not supported")
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.dtype not in _FLOAT_DTYPES:
        raise _reject_layout(
            experts, f"gate_up_proj is {tuple(gate_up.shape)} {gate_up.dtype}, expected a 3-D unquantized float tensor"
        )
    layout = CheckpointLayout(
        "fused", transposed=getattr(experts, "is_transposed", False),
        interleaved=not getattr(experts, "is_concatenated", True), has_bias=getattr(experts, "has_bias", False),
    )
    return ExpertWeights.read(layout, experts)


def _experts_weights(block: nn.Module) -> ExpertWeights:
    return standard_weights(block.experts)


def _dbrx_weights(block: nn.Module) -> ExpertWeights:
    # DBRX stores w1 (gate), v1 (up) and w2 (down, transposed) as [E * N, K] each
    return ExpertWeights.read(CheckpointLayout("dbrx", num_experts=block.experts.num_experts), block.experts)


# ------------------------------------------------------------------------------------ activations
def _hidden_act(block: nn.Module, config: object) -> ActivationSpec:
    experts = block.experts
    return activation_from_hf(experts.config.hidden_act, type(experts).__name__)


def _gpt_oss_act(block: nn.Module, config: object) -> ActivationSpec:
    # gpt-oss's clamped SwiGLU: (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=l)
    return ActivationSpec(name="swigluoai", alpha=block.experts.alpha, limit=block.experts.limit)


def _dbrx_act(block: nn.Module, config: object) -> ActivationSpec:
    ffn_config = getattr(config, "ffn_config", None)
    act = getattr(ffn_config, "ffn_act_fn", None) or {"name": "silu"}
    return activation_from_hf(act.get("name", "silu"), "DbrxExperts")


# ------------------------------------------------------------------------------------ routing
def _softmax_topk(block: nn.Module) -> Routing:
    # Mixtral: softmax in fp32, top-k, renormalize; the fp32 weights reach the experts as they are
    return Routing(block.gate.top_k, RoutingConfig(method="topk", renormalize=True))


def _qwen_topk(block: nn.Module) -> Routing:
    # Qwen2-MoE, Qwen3-MoE, OLMoE: renormalize only with norm_topk_prob, then cast to the logits' dtype
    router = block.gate
    return Routing(router.top_k, RoutingConfig(method="topk", renormalize=bool(router.norm_topk_prob)),
                   round_weights=True)


def _topk_then_softmax(router_attr: str) -> Callable[[nn.Module], Routing]:
    # GraniteMoE, gpt-oss: top-k on the logits, softmax over the k, weights cast to the activations' dtype
    def routing(block: nn.Module) -> Routing:
        router = getattr(block, router_attr)
        return Routing(router.top_k, RoutingConfig(method="topk_then_softmax"), round_weights=True)

    return routing


def _deepseek_v2(block: nn.Module) -> Routing:
    # fp32 router; softmax scores; greedy or group-limited (group score = max); no renorm; scaled
    router = block.gate
    scale = float(router.routed_scaling_factor)
    if router.topk_method == "greedy":
        return Routing(router.top_k, RoutingConfig(method="topk", renormalize=False, routed_scaling_factor=scale))
    if router.topk_method == "group_limited_greedy":
        return Routing(router.top_k, RoutingConfig(
            method="grouped_topk", num_expert_group=router.num_group, topk_group=router.topk_group,
            renormalize=False, routed_scaling_factor=scale,
        ))
    raise ValueError(
        f"DeepseekV2TopkRouter: topk_method={router.topk_method!r} is not supported; "
        "supported: 'greedy', 'group_limited_greedy'"
    )


def _deepseek_v3(block: nn.Module) -> Routing:
    # fp32 router; sigmoid scores; correction bias for selection; groups by top-2 sum; renorm; scaled
    router = block.gate
    return Routing(router.top_k, RoutingConfig(
        method="grouped_topk", scoring="sigmoid", num_expert_group=router.num_group, topk_group=router.topk_group,
        renormalize=bool(router.norm_topk_prob), routed_scaling_factor=float(router.routed_scaling_factor),
        use_correction_bias=True,
    ), correction_bias="e_score_correction_bias")


def _dbrx(block: nn.Module) -> Routing:
    # softmax and p-norm in the model dtype: the weights are already rounded like DBRX's
    p = block.moe_normalize_expert_weights
    return Routing(block.top_k, custom=PNormSoftmaxTopk(None if p is None else float(p)))


# ------------------------------------------------------------------------------------ the table
FAMILIES: tuple[Family, ...] = (
    Family("mixtral", "MixtralSparseMoeBlock", "MixtralExperts", "gate", _softmax_topk, _experts_weights,
           _hidden_act),
    Family("qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeExperts", "gate", _qwen_topk, _experts_weights,
           _hidden_act, shared_attr="shared_expert", shared_gate_attr="shared_expert_gate"),
    Family("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeExperts", "gate", _qwen_topk, _experts_weights,
           _hidden_act),
    Family("deepseek_v2", "DeepseekV2Moe", "DeepseekV2Experts", "gate", _deepseek_v2, _experts_weights,
           _hidden_act, shared_attr="shared_experts"),
    Family("deepseek_v3", "DeepseekV3MoE", "DeepseekV3Experts", "gate", _deepseek_v3, _experts_weights,
           _hidden_act, shared_attr="shared_experts"),
    Family("gpt_oss", "GptOssMLP", "GptOssExperts", "router", _topk_then_softmax("router"), _experts_weights,
           _gpt_oss_act, returns_router_scores=True),
    Family("olmoe", "OlmoeSparseMoeBlock", "OlmoeExperts", "gate", _qwen_topk, _experts_weights, _hidden_act),
    Family("granitemoe", "GraniteMoeMoE", "GraniteMoeExperts", "router", _topk_then_softmax("router"),
           _experts_weights, _hidden_act),
    Family("dbrx", "DbrxFFN", "DbrxExperts", "router", _dbrx, _dbrx_weights, _dbrx_act),
)

_BY_CLASS = {f.block_class: f for f in FAMILIES}


def family_for(module: nn.Module) -> Family | None:
    """The family of a transformers block (matched by class name within ``transformers.models``)."""
    cls = type(module)
    if not cls.__module__.startswith("transformers.models."):
        return None
    return _BY_CLASS.get(cls.__name__)


def supported_block_classes() -> list[str]:
    return [f.block_class for f in FAMILIES]
