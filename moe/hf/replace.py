"""Swap the sparse-MoE blocks of a loaded transformers model for modules built on ``FusedMoE``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoints import (
    QuantizedMLP,
    StateDictSource,
    TensorSource,
    checkpoint_scheme,
    find_experts,
    load_experts,
    open_source,
)
from ..checkpoints.names import ExpertNaming
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


@dataclass(frozen=True)
class CheckpointExperts:
    """Experts to load from checkpoint files instead of the module: where (``source``, ``naming``), in which
    moe scheme (``quant``, None: float), the layer's dims and activation dtype, and whether the experts
    have biases (gpt-oss)."""

    source: TensorSource
    naming: ExpertNaming
    quant: str | None
    num_experts: int
    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype
    device: torch.device
    bias: bool = False


class MoEBlock(nn.Module):
    """A transformers sparse-MoE block rebuilt on :class:`FusedMoE`.

    The original router stays a child under its original name and is called on every forward, so
    hooks on it (the router-logit outputs used by auxiliary losses) keep working; routing then runs in
    moe with the family's exact rule, and the experts (plus shared experts) run on ``FusedMoE``.
    Returns what the original block returned (gpt-oss: ``(hidden_states, router_scores)``), and keeps
    the original block's state-dict names and layout (``save_pretrained`` writes an original checkpoint).
    Given :class:`CheckpointExperts` instead of ``weights``, the experts are loaded from the checkpoint
    files in its scheme (``moe.checkpoints``), and the state dict holds the canonical quantized form.
    """

    def __init__(
        self,
        family: Family,
        router: nn.Module,
        routing: Routing,
        weights: ExpertWeights | CheckpointExperts,
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
        if isinstance(weights, CheckpointExperts):
            (num_experts, hidden, n), quant = (weights.num_experts, weights.hidden_size,
                                               weights.intermediate_size), weights.quant
            bias, dtype = weights.bias, weights.dtype
        else:
            (num_experts, _, hidden), n, quant = weights.w13.shape, weights.w2.shape[2], None
            bias, dtype = weights.w13_bias is not None, weights.w13.dtype
        # moe's routing runs inside FusedMoE when a RoutingConfig says it all; otherwise through _route
        direct = not (routing.round_weights or routing.correction_bias or routing.custom)
        self.moe = FusedMoE(
            num_experts, routing.top_k, hidden, n,
            routing=routing.config if direct else RoutingConfig(method="custom"),
            custom_routing_function=None if direct else self._route,
            activation=activation, bias=bias, params_dtype=dtype, quant=quant,
            device="meta", backend=backend, gate=False, shared_experts=shared_experts,
            shared_expert_gate=shared_expert_gate if shared_expert_gate is not None else False,
        )
        if isinstance(weights, CheckpointExperts):
            load_experts(self.moe, weights.source, weights.naming.prefix, device=weights.device)
            return
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


# checkpoint names of a block that differ from its module name in transformers 5
_CHECKPOINT_ALIASES = {"mixtral": (".mlp", ".block_sparse_moe")}


def checkpoint_prefixes(name: str, family: Family, attr: str = "experts") -> list[str]:
    """Where the checkpoint keeps ``attr`` (the experts, or the shared experts) of the block at module
    ``name``: the module name itself, then the family's older checkpoint names (Mixtral's
    ``block_sparse_moe``)."""
    found = [f"{name}.{attr}"]
    if family.name in _CHECKPOINT_ALIASES:
        new, old = _CHECKPOINT_ALIASES[family.name]
        found.append(f"{name.replace(new, old)}.{attr}")
    return found


def _checkpoint_experts(family: Family, block: nn.Module, name: str, src: TensorSource,
                        dtype: torch.dtype) -> CheckpointExperts:
    if family.name == "dbrx":
        raise ValueError(f"replace_moe_blocks: checkpoint=... reads experts stored per expert or in transformers' "
                         f"fused layout; {family.name}'s experts ({name}) are not read from files yet")
    experts = block.experts
    num_experts, rows, hidden = experts.gate_up_proj.shape  # float, or transformers' FP8 data
    if getattr(experts, "is_transposed", False):  # gpt-oss: [E, K, 2N]
        num_experts, hidden, rows = experts.gate_up_proj.shape
    naming = find_experts(src, checkpoint_prefixes(name, family), 0)
    quant = checkpoint_scheme(src, naming.prefix, num_experts, hidden_size=hidden, intermediate_size=rows // 2)
    return CheckpointExperts(src, naming, quant, num_experts, hidden, rows // 2, dtype, experts.gate_up_proj.device,
                             bias=bool(getattr(experts, "has_bias", False)))


def _shared_from_checkpoint(family: Family, block: nn.Module, name: str, src: TensorSource, config: object,
                            backend: str, dtype: torch.dtype) -> nn.Module | None:
    """The block's shared experts: loaded quantized from the checkpoint when it stores them quantized, else
    the original module (float, as transformers loaded it)."""
    if not family.shared_attr:
        return None
    original = getattr(block, family.shared_attr)
    prefix = checkpoint_prefixes(name, family, family.shared_attr)[0]
    quant = checkpoint_scheme(src, prefix, 1)
    if quant is None:
        return original
    rows, hidden = original.gate_proj.weight.shape
    activation = activation_from_hf(getattr(config, "hidden_act", "silu"), type(original).__name__)
    shared = QuantizedMLP(hidden, rows, activation=activation, quant=quant, params_dtype=dtype, device="meta",
                          backend=backend)
    load_experts(shared.mlp, src, prefix, device=original.gate_proj.weight.device)
    return shared


def _quantized_in_module(block: nn.Module) -> bool:
    """Whether transformers kept the block's experts quantized (its FP8 experts, where it has FP8 kernels)."""
    data = getattr(getattr(block, "experts", None), "gate_up_proj", None)
    return isinstance(data, torch.Tensor) and data.dtype in (torch.float8_e4m3fn, torch.int8)


def _module_source(block: nn.Module, name: str, config: object) -> TensorSource:
    """The block's own tensors (transformers' quantized experts: ``gate_up_proj``, ``gate_up_proj_scale_inv``,
    ...) as a checkpoint in the model's ``quantization_config``."""
    qconfig = getattr(config, "quantization_config", None)
    as_dict = qconfig.to_dict() if hasattr(qconfig, "to_dict") else qconfig
    if not isinstance(as_dict, dict):
        raise ValueError(f"replace_moe_blocks: {name} holds quantized experts but the model config has no "
                         "quantization_config to say their format; pass checkpoint=PATH")
    return StateDictSource(block.state_dict(prefix=f"{name}."), as_dict, name=f"{name} (transformers' tensors)")


def _build_block(family: Family, block: nn.Module, name: str, config: object, backend: str,
                 checkpoint: TensorSource | None, dtype: torch.dtype) -> MoEBlock:
    """The MoEBlock of ``block`` (at module ``name``): its experts from the module, or loaded quantized from
    ``checkpoint`` or from the module's own quantized tensors (transformers kept them quantized)."""
    shared = getattr(block, family.shared_attr) if family.shared_attr else None
    shared_gate = getattr(block, family.shared_gate_attr) if family.shared_gate_attr else None
    weights: ExpertWeights | CheckpointExperts
    src = _module_source(block, name, config) if checkpoint is None and _quantized_in_module(block) else checkpoint
    if src is None:
        weights = family.weights(block)
    else:
        weights = _checkpoint_experts(family, block, name, src, dtype)
        shared = _shared_from_checkpoint(family, block, name, src, config, backend, dtype)
    return MoEBlock(
        family, getattr(block, family.router_attr), family.routing(block), weights,
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


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The activation dtype: of the first float parameter wider than a byte (not FP8 data)."""
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point and p.element_size() > 1),
                torch.float32)


def replace_moe_blocks(
    model: nn.Module,
    backend: str = "auto",
    *,
    generic: bool = True,
    checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor] | TensorSource | None = None,
) -> list[str]:
    """Replace, in place, every sparse-MoE block of a loaded transformers model with a :class:`MoEBlock`
    built on :class:`FusedMoE`, and return the names of the replaced modules.

    Expert weights are shared with the original tensors where the layout matches and converted once
    where it does not (gpt-oss, DBRX); the original experts modules are dropped. With ``generic=True``,
    experts of block classes outside the family table that use transformers' standard fused layout are
    replaced by :class:`MoEExperts` (the block keeps its own routing); with ``generic=False`` they are
    an error. Raises ``ValueError`` when the model has no MoE block we recognise.

    ``checkpoint`` (the model's directory of safetensors files, or a state dict) loads the routed experts
    of the family blocks from the files in the checkpoint's own quantization (``quantization_config`` of
    its ``config.json``; ``moe.checkpoints``), kept quantized, instead of taking the module's tensors
    (which transformers dequantized where it has no quantized kernel, as on CPU). A block at module
    ``model.layers.3.mlp`` finds its experts under ``model.layers.3.mlp.experts`` (Mixtral also under
    ``model.layers.3.block_sparse_moe.experts``), per expert or fused, through the safetensors index;
    quantized shared experts become a :class:`~moe.checkpoints.QuantizedMLP` loaded the same way.
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
    src = open_source(checkpoint) if checkpoint is not None else None
    dtype = _model_dtype(model)
    done: list[tuple[str, nn.Module]] = []
    try:
        for name, module, family in blocks:
            _set_child(model, name, _build_block(family, module, name, _config_for(name, configs), backend, src, dtype))
            done.append((name, module))
        for name, module in unknown:
            _set_child(model, name, _build_experts(module, backend))
            done.append((name, module))
    except Exception:
        for name, module in done:  # all or nothing: put the original modules back
            _set_child(model, name, module)
        raise
    return [name for name, _ in done]
