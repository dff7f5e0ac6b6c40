"""Tiny random-weight models of every supported family, built offline from their config classes.

Used by the tests, ``moe hf-check FAMILY`` and the benchmark's ``--tiny`` mode. Random init leaves some
tensors at zero (router and expert biases, DeepSeek-V3's correction bias) and most weights small;
:func:`randomize` gives every MoE-relevant tensor a scale at which routing and the activation matter,
and gpt-oss's experts a scale at which its SwiGLU clamp is reached.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .families import family_for

__all__ = ["TINY_FAMILIES", "randomize", "tiny_config", "tiny_model"]

_COMMON: dict[str, Any] = dict(
    vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
_MLA: dict[str, Any] = dict(  # DeepSeek's latent attention: one KV head per query head
    num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)

# family -> (transformers config class, causal-LM class, config arguments)
_TINY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        intermediate_size=40, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_hidden_layers=3,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, head_dim=8)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        _MLA, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, first_k_dense_replace=1,
        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, topk_method="greedy",
        routed_scaling_factor=1.5)),
    "deepseek_v2_grouped": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        _MLA, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, first_k_dense_replace=1,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, routed_scaling_factor=2.0)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        _MLA, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, first_k_dense_replace=1,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        intermediate_size=24, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=131072)),  # what its default YaRN rope scaling implies
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        intermediate_size=24, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(
        intermediate_size=24, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
        embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0)),
    "dbrx": ("DbrxConfig", "DbrxForCausalLM", dict(
        d_model=32, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=96,
        attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 8, "moe_top_k": 2})),
}

TINY_FAMILIES: tuple[str, ...] = tuple(_TINY)


def tiny_config(family: str, **overrides: Any) -> Any:
    """The tiny config of ``family`` (eager attention and experts, so it is the reference)."""
    import transformers

    if family not in _TINY:
        raise ValueError(f"tiny_config: unknown family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    config_cls, _, kwargs = _TINY[family]
    base = {} if family == "dbrx" else dict(_COMMON)
    base.update(kwargs)
    base.update(overrides)
    return getattr(transformers, config_cls)(
        **base, attn_implementation="eager", experts_implementation="eager"
    )


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> nn.Module:
    """A tiny random causal LM of ``family`` in eval mode, the same for the same seed."""
    import transformers

    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, _TINY[family][1])(config)
        randomize(model)
    return model.to(dtype).eval()


def _normal_(t: torch.Tensor, std: float) -> None:
    with torch.no_grad():
        t.normal_(0.0, std)


@torch.no_grad()
def randomize(model: nn.Module) -> None:
    """O(1)-scale weights everywhere (Linear: std 1/sqrt(fan_in); embeddings: std 1), random routers,
    router, expert and correction biases, and gpt-oss experts scaled 4x so its clamp (limit 7) is reached.
    Experts in transformers' standard layout are randomized whether or not their family is in the table."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            _normal_(module.weight, module.in_features**-0.5)
            if module.bias is not None:
                _normal_(module.bias, 0.1)
        elif isinstance(module, nn.Embedding):
            _normal_(module.weight, 1.0)
    for module in model.modules():
        family = family_for(module)
        if family is not None and family.name == "dbrx":
            _randomize_dbrx(module)
        elif family is not None:
            _randomize_router(getattr(module, family.router_attr))
        if isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) and hasattr(module, "is_transposed"):
            _randomize_experts(module, scale=4.0 if type(module).__name__ == "GptOssExperts" else 1.0)


def _randomize_router(router: nn.Module) -> None:
    if isinstance(router, nn.Linear):
        return  # done with every Linear
    _normal_(router.weight, router.weight.shape[1] ** -0.5)
    if getattr(router, "bias", None) is not None:
        _normal_(router.bias, 0.5)
    if hasattr(router, "e_score_correction_bias"):
        _normal_(router.e_score_correction_bias, 0.1)


def _randomize_experts(experts: nn.Module, scale: float) -> None:
    gate_up, down = experts.gate_up_proj, experts.down_proj
    k, n = (gate_up.shape[1], down.shape[1]) if experts.is_transposed else (gate_up.shape[2], down.shape[2])
    _normal_(gate_up, scale / math.sqrt(k))
    _normal_(down, n**-0.5)
    if experts.has_bias:
        _normal_(experts.gate_up_proj_bias, 0.5)
        _normal_(experts.down_proj_bias, 0.5)


def _randomize_dbrx(block: nn.Module) -> None:
    mlp, n, k = block.experts.mlp, block.experts.ffn_hidden_size, block.experts.hidden_size
    _normal_(mlp.w1, k**-0.5)
    _normal_(mlp.v1, k**-0.5)
    _normal_(mlp.w2, n**-0.5)  # used as intermediate @ w2: fan-in N
