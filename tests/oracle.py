"""Independent float64 oracles: straightforward loops, written without the package's helpers."""

from __future__ import annotations

import math

import torch


def act64(name: str, h: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """The activation on a float64 vector h ([2N] gated, [N] otherwise)."""
    silu = lambda v: v / (1 + torch.exp(-v))
    gelu = lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))
    gelu_tanh = lambda v: 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
    if name == "relu2":
        return torch.clamp(h, min=0) ** 2
    if name == "silu_no_mul":
        return silu(h)
    if name == "gelu_no_mul":
        return gelu(h)
    n = h.shape[0] // 2
    g, u = h[:n], h[n:]
    if name == "swigluoai":
        g = torch.clamp(g, max=limit)
        u = torch.clamp(u, min=-limit, max=limit)
        return (u + 1) * g / (1 + torch.exp(-alpha * g))
    return {"silu": silu, "gelu": gelu, "gelu_tanh": gelu_tanh}[name](g) * u


def experts64(x, w13, w2, weights, ids, activation="silu", w13_bias=None, w2_bias=None,
              on_input=False, expert_map=None, alpha=1.702, limit=7.0) -> torch.Tensor:
    """Per (token, slot) loop in float64 (moe.testing's) with this file's own activation formulas."""
    from moe.testing import experts_float64

    return experts_float64(x, w13, w2, weights, ids, activation, w13_bias, w2_bias, on_input, expert_map,
                           act=lambda h: act64(activation, h, alpha, limit))


def _softmax(row: list[float]) -> list[float]:
    """A row of -inf only (a fully masked token) scores 0 everywhere."""
    m = max(row)
    if m == -math.inf:
        return [0.0] * len(row)
    ex = [math.exp(v - m) for v in row]
    return [v / sum(ex) for v in ex]


def _renorm(w: list[float]) -> list[float]:
    total = sum(w)
    return [v / total for v in w] if total != 0 else w


def _order(scores: list[float]) -> list[int]:
    """Indices by descending score, ties to the lower index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def topk_route64(logits, k, renormalize=True, scoring="softmax"):
    out_w, out_ids = [], []
    for row in logits.double().tolist():
        s = _softmax(row) if scoring == "softmax" else [1 / (1 + math.exp(-v)) for v in row]
        top = _order(s)[:k]
        w = [s[i] for i in top]
        if renormalize:
            w = _renorm(w)
        out_w.append(w)
        out_ids.append(top)
    return torch.tensor(out_w, dtype=torch.float64), torch.tensor(out_ids)


def topk_softmax64(logits, k):
    out_w, out_ids = [], []
    for row in logits.double().tolist():
        top = _order(row)[:k]
        out_w.append(_softmax([row[i] for i in top]))
        out_ids.append(top)
    return torch.tensor(out_w, dtype=torch.float64), torch.tensor(out_ids)


def grouped_route64(logits, k, num_groups, topk_group, renormalize, scoring, bias, scale):
    out_w, out_ids = [], []
    e = logits.shape[1]
    per = e // num_groups
    for row in logits.double().tolist():
        s = _softmax(row) if scoring == "softmax" else [1 / (1 + math.exp(-v)) for v in row]
        c = [s[i] + (float(bias[i]) if bias is not None else 0.0) for i in range(e)]
        gscore = []
        for g in range(num_groups):
            vals = sorted(c[g * per:(g + 1) * per], reverse=True)
            gscore.append(vals[0] + vals[1] if bias is not None else vals[0])
        keep = set(_order(gscore)[:topk_group])
        cand = [c[i] if i // per in keep else -math.inf for i in range(e)]
        top = _order(cand)[:k] if max(row) > -math.inf else list(range(k))  # a fully masked token: ids 0..k-1
        w = [s[i] for i in top]
        if renormalize:
            w = _renorm(w)
        out_w.append([v * scale for v in w])
        out_ids.append(top)
    return torch.tensor(out_w, dtype=torch.float64), torch.tensor(out_ids)
