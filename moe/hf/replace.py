"""Swap the sparse-MoE blocks of a loaded transformers model for modules built on ``FusedMoE``."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ActivationSpec, RoutingConfig
from ..functional import fused_experts
from ..layer import FusedMoE
from ..registry import get_backend
from ..routing import route
from .families import ExpertWeights, Family, Routing, activation_from_hf, family_for, standard_weights
from .families import supported_block_classes as _supported
from .layout import OURS, CheckpointLayout

__all__ = ["MoEBlock", "MoEExperts", "replace_moe_blocks"]


_PARAM = {"w13": "w13_weight", "w2": "w2_weight", "w13_bias": "w13_bias", "w2_bias": "w2_bias"}


def _frozen(t: torch.Tensor | None) -> nn.Parameter | None:
    # a new Parameter object on the same tensor: storage is shared, autograd is off (inference layer)
    return None if t is None else nn.Parameter(t.detach(), requires_grad=False)


def _keep_original_format(
    module: nn.Module, layout: CheckpointLayout, ours: str, theirs: str, renames: dict[str, str]
) -> None:
    """Keep ``module``'s checkpoint in the original format: ``state_dict()`` (so ``save_pretrained``)
    writes the original names and layout, and ``load_state_dict`` reads them. ``ours`` is the prefix of
    our expert parameters, ``theirs`` that of the original experts, ``renames`` maps our other
    prefixes (the shared experts inside FusedMoE) to the original ones."""
    module.layout = layout
    module._original_names = (ours, theirs, renames)
    module.register_state_dict_post_hook(_save_original)
    module.register_load_state_dict_pre_hook(_load_original)


def _rename(state_dict: dict, prefix: str, renames: dict[str, str]) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        for old, new in renames.items():
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
                break


def _save_original(module: nn.Module, state_dict: dict, prefix: str, local_metadata: object) -> None:
    ours, theirs, renames = module._original_names
    keys = {name: f"{prefix}{ours}{_PARAM[name]}" for name in OURS}
    if keys["w13"] not in state_dict:
        return
    tensors = {name: state_dict.pop(key, None) for name, key in keys.items()}
    for key, tensor in module.layout.to_original(tensors).items():
        state_dict[f"{prefix}{theirs}{key}"] = tensor
    _rename(state_dict, prefix, renames)


def _load_original(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    ours, theirs, renames = module._original_names
    if not all(f"{prefix}{theirs}{key}" in state_dict for key in module.layout.original_keys()):
        return  # not the original format: load it as it is
    original = {key: state_dict.pop(f"{prefix}{theirs}{key}") for key in module.layout.original_keys()}
    for name, tensor in module.layout.to_ours(original).items():
        if tensor is not None:
            state_dict[f"{prefix}{ours}{_PARAM[name]}"] = tensor
    _rename(state_dict, prefix, {new: old for old, new in renames.items()})


class MoEBlock(nn.Module):
    """A transformers sparse-MoE block rebuilt on :class:`FusedMoE`.

    The original router stays a child under its original name and is called on every forward, so
    hooks on it (the router-logit outputs used by auxiliary losses) keep working; routing then runs in
    moe with the family's exact rule, and the experts (plus shared experts) run on ``FusedMoE``.
    Returns what the original block returned (gpt-oss: ``(hidden_states, router_scores)``), and keeps
    the original block's state-dict names and layout (``save_pretrained`` writes an original checkpoint).
    """

    def __init__(
        self,
        family: Family,
        router: nn.Module,
        routing: Routing,
        weights: ExpertWeights,
        activation: ActivationSpec,
        *,
        shared_experts: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.family = family.name
        self.router_attr = family.router_attr
        self.returns_router_scores = family.returns_router_scores
        self.routing = routing
        setattr(self, family.router_attr, router)
        num_experts, _, hidden = weights.w13.shape
        # moe's routing runs inside FusedMoE when a RoutingConfig says it all; otherwise through _route
        direct = not (routing.round_weights or routing.correction_bias or routing.custom)
        self.moe = FusedMoE(
            num_experts, routing.top_k, hidden, weights.w2.shape[2],
            routing=routing.config if direct else RoutingConfig(method="custom"),
            custom_routing_function=None if direct else self._route,
            activation=activation, bias=weights.w13_bias is not None, params_dtype=weights.w13.dtype,
            device="meta", backend=backend, gate=False, shared_experts=shared_experts,
            shared_expert_gate=shared_expert_gate if shared_expert_gate is not None else False,
        )
        self.moe.w13_weight, self.moe.w2_weight = _frozen(weights.w13), _frozen(weights.w2)
        self.moe.w13_bias, self.moe.w2_bias = _frozen(weights.w13_bias), _frozen(weights.w2_bias)
        renames = {}  # FusedMoE holds the original shared-expert modules under its own names
        if family.shared_attr:
            renames["moe.shared_experts."] = f"{family.shared_attr}."
        if family.shared_gate_attr:
            renames["moe.shared_expert_gate."] = f"{family.shared_gate_attr}."
        _keep_original_format(self, weights.layout, "moe.", "experts.", renames)

    def _router(self) -> nn.Module:
        return self._modules[self.router_attr]

    def _route(
        self, hidden_states: torch.Tensor, router_logits: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.routing
        if r.custom is not None:
            return r.custom(hidden_states, router_logits, top_k)
        bias = getattr(self._router(), r.correction_bias) if r.correction_bias else None
        weights, ids = route(router_logits, top_k, r.config, e_score_correction_bias=bias)
        if r.round_weights:
            weights = weights.to(hidden_states.dtype)
        return weights, ids

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, K]
        router_out = self._router()(x)
        logits = router_out[0] if isinstance(router_out, tuple) else router_out  # [T, E]
        out = self.moe(x, logits).view(shape)
        if self.returns_router_scores:
            return out, router_out[1]
        return out

    def extra_repr(self) -> str:
        return f"family={self.family!r}"


class MoEExperts(nn.Module):
    """A drop-in for a transformers experts module in the standard fused layout, for blocks of families
    not in the table: same call ``(hidden_states, top_k_index, top_k_weights)``, so the block keeps
    its own routing and shared experts, and the experts run on moe's backends."""

    def __init__(self, weights: ExpertWeights, activation: ActivationSpec, backend: str = "auto") -> None:
        super().__init__()
        self.activation = activation
        self.backend = backend
        self.w13_weight, self.w2_weight = _frozen(weights.w13), _frozen(weights.w2)
        self.w13_bias, self.w2_bias = _frozen(weights.w13_bias), _frozen(weights.w2_bias)
        _keep_original_format(self, weights.layout, "", "", {})

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return fused_experts(
            hidden_states, self.w13_weight, self.w2_weight, top_k_weights.float(), top_k_index,
            activation=self.activation, w13_bias=self.w13_bias, w2_bias=self.w2_bias, backend=self.backend,
        )

    def extra_repr(self) -> str:
        e, k, n = self.w2_weight.shape
        return f"experts={e}, hidden={k}, intermediate={n}, activation={self.activation.name}"


def _build_block(family: Family, block: nn.Module, config: object, backend: str) -> MoEBlock:
    shared = getattr(block, family.shared_attr) if family.shared_attr else None
    shared_gate = getattr(block, family.shared_gate_attr) if family.shared_gate_attr else None
    return MoEBlock(
        family, getattr(block, family.router_attr), family.routing(block), family.weights(block),
        family.activation(block, config), shared_experts=shared, shared_expert_gate=shared_gate, backend=backend,
    )


def generic_experts_reason(experts: nn.Module) -> str | None:
    """Why an experts module in transformers' standard interface cannot run on moe as it is (None: it can)."""
    from transformers.integrations.moe import _default_apply_gate

    name = type(experts).__name__
    if getattr(experts, "has_post_expert_norm", False):
        return f"{name} applies a norm after each expert, which moe's experts do not"
    if getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        return f"{name} defines its own gating (_apply_gate), whose activation moe cannot infer"
    if getattr(experts, "_is_expert_parallel", False):
        return f"{name} is expert-parallel (transformers' EP), which moe.hf does not handle"
    hidden_act = getattr(getattr(experts, "config", None), "hidden_act", None)
    if not isinstance(hidden_act, str):
        return f"{name} has no config.hidden_act to name its activation"
    return None


def _is_standard_experts(module: nn.Module) -> bool:
    # what @use_experts_implementation adds to an experts class
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate") and hasattr(module, "has_bias")


def _build_experts(experts: nn.Module, backend: str) -> MoEExperts:
    reason = generic_experts_reason(experts)
    if reason is not None:
        raise ValueError(f"cannot replace {type(experts).__name__} generically: {reason}")
    activation = activation_from_hf(experts.config.hidden_act, type(experts).__name__)
    return MoEExperts(standard_weights(experts), activation, backend)


def _configs_by_prefix(model: nn.Module) -> list[tuple[str, object]]:
    """(module-name prefix, config) of every transformers model inside ``model``, innermost first."""
    from transformers import PreTrainedModel

    found = [(name, m.config) for name, m in model.named_modules() if isinstance(m, PreTrainedModel)]
    return sorted(found, key=lambda item: -len(item[0]))


def _config_for(name: str, configs: list[tuple[str, object]]) -> object:
    for prefix, config in configs:
        if not prefix or name.startswith(prefix + "."):
            return config
    return None


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def replace_moe_blocks(model: nn.Module, backend: str = "auto", *, generic: bool = True) -> list[str]:
    """Replace, in place, every sparse-MoE block of a loaded transformers model with a :class:`MoEBlock`
    built on :class:`FusedMoE`, and return the names of the replaced modules.

    Expert weights are shared with the original tensors where the layout matches and converted once
    where it does not (gpt-oss, DBRX); the original experts modules are dropped. With ``generic=True``,
    experts of block classes outside the family table that use transformers' standard fused layout are
    replaced by :class:`MoEExperts` (the block keeps its own routing); with ``generic=False`` they are
    an error. Raises ``ValueError`` when the model has no MoE block we recognise.
    """
    if backend != "auto":
        get_backend(backend)  # an unknown name fails now, not at the first forward
    if model.training:
        raise ValueError("replace_moe_blocks: the model is in training mode; moe.hf replaces blocks for "
                         "inference (router jitter and gradients are not kept): call model.eval() first")
    configs = _configs_by_prefix(model)
    blocks: list[tuple[str, nn.Module, Family]] = []
    unknown: list[tuple[str, nn.Module]] = []
    ours = 0
    handled = None  # named_modules() is pre-order: a handled module's descendants follow it
    for name, module in model.named_modules():
        if handled is not None and name.startswith(handled):
            continue
        family = family_for(module)
        if family is not None:
            blocks.append((name, module, family))
        elif isinstance(module, (MoEBlock, MoEExperts)):
            ours += 1
        elif _is_standard_experts(module):
            unknown.append((name, module))
        else:
            continue
        handled = name + "."
    if not blocks and not unknown and not ours:
        raise ValueError(
            f"replace_moe_blocks: no sparse MoE block found in {type(model).__name__}; supported block classes: "
            f"{', '.join(_supported())}; experts modules in transformers' standard fused layout "
            "(@use_experts_implementation) are handled generically"
        )
    if unknown and not generic:
        raise ValueError(
            f"replace_moe_blocks: {type(unknown[0][1]).__name__} (at {unknown[0][0]!r}) belongs to a block class "
            f"moe.hf does not know; supported block classes: {', '.join(_supported())}. Pass generic=True to "
            "replace experts in transformers' standard fused layout while the block keeps its own routing"
        )
    done: list[tuple[str, nn.Module]] = []
    try:
        for name, module, family in blocks:
            _set_child(model, name, _build_block(family, module, _config_for(name, configs), backend))
            done.append((name, module))
        for name, module in unknown:
            _set_child(model, name, _build_experts(module, backend))
            done.append((name, module))
    except Exception:
        for name, module in done:  # all or nothing: put the original modules back
            _set_child(model, name, module)
        raise
    return [name for name, _ in done]
