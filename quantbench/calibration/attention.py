"""Attention-weighted Hessians for the value projection.

A value projection's output never reaches the residual stream directly: query head ``h`` at
position ``q`` reads ``Σ_t p_qt · W_v x_t``, the attention-weighted mix of every earlier token's
value. An error ``ΔW`` in the rows of key/value head ``g`` therefore changes head ``h``'s output
by ``ΔW · z_q`` with ``z_q = Σ_t p_qt x_t``, and the output error those rows cause is exactly
``tr(ΔW H_g ΔWᵀ)`` with

    H_g = 2/n · Σ_{h reads g} Σ_q z_q z_qᵀ

(``n`` tokens, ``h`` over the query heads sharing kv head ``g``). The plain input Hessian
``2/n · Σ_t x_t x_tᵀ`` weighs every token alike, while attention concentrates on a few tokens
(the first token of a window — the attention sink — takes much of every head's mass), so an
error on the sink token's value reaches every later position. On the sample, GPTQ on Q5_0/Q8_0
with ``H_g`` instead of the input Hessian cuts the v_proj share of Q4_K_M's KLD by ~7x.

:func:`value_hessians` runs the attention mixer once over the calibration batches with an
attention function that records the softmax probabilities (eager maths; an absent mask means
causal, as in SDPA) and accumulates ``H_g`` per kv head.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from quantbench.lazy import torch

PROBE = "quantbench_probe"


@dataclass
class HeadHessians:
    """The value projection's statistic: one Hessian per kv head, ``[n_kv, hidden, hidden]``;
    head ``g`` owns output rows ``g·rows/n_kv … (g+1)·rows/n_kv``. For a value projection
    fused with others (Phi-3's ``qkv_proj``), ``value_rows`` are the value rows of the stored
    weight and ``others`` the plain input Hessian its remaining rows are swept on."""

    per_head: torch.Tensor
    value_rows: slice | None = None
    others: torch.Tensor | None = None

    def to(self, device: torch.device) -> HeadHessians:
        return HeadHessians(self.per_head.to(device), self.value_rows,
                            None if self.others is None else self.others.to(device))

    def blocks(self, out_features: int) -> tuple[list[slice], torch.Tensor]:
        """Row blocks of the stored weight and the Hessian of each ``[blocks, in, in]``: the
        kv heads' value rows, and (fused) the rows before and after them on ``others``."""
        v = self.value_rows
        if v is None:
            return self.rows(out_features), self.per_head
        heads = [slice(v.start + r.start, v.start + r.stop) for r in self.rows(v.stop - v.start)]
        before = [slice(0, v.start)] if v.start else []
        after = [slice(v.stop, out_features)] if v.stop < out_features else []
        hessians = [self.others] * len(before) + list(self.per_head) + [self.others] * len(after)
        return before + heads + after, torch.stack(hessians)

    def rows(self, out_features: int) -> list[slice]:
        n = self.per_head.shape[0]
        if out_features % n:
            raise ValueError(f"{out_features} value rows do not split into {n} kv heads")
        step = out_features // n
        return [slice(g * step, (g + 1) * step) for g in range(n)]


def _probe_attention(sink: Callable[[torch.Tensor], None]):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                  **kwargs):
        """Eager attention (``query [b, heads, q, d]``, ``key/value [b, kv, k, d]``) that
        hands the probabilities ``[b, heads, q, k]`` to ``sink``."""
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scale
        softcap = kwargs.get("softcap")  # Gemma 2 caps the attention logits: c·tanh(s/c)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        q_len, k_len = scores.shape[-2:]
        if attention_mask is not None:
            mask = attention_mask[:, :, :, :k_len]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
                else scores + mask.float()
        elif getattr(module, "is_causal", True) and q_len > 1:
            future = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).triu(
                k_len - q_len + 1)
            scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        sink(probs)
        out = torch.matmul(probs.to(value.dtype), value)
        return out.transpose(1, 2).contiguous(), probs
    return attention


@contextmanager
def probing(config: Any, sink: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """While inside, attention modules reading ``config`` use the recording attention."""
    from transformers import AttentionInterface

    AttentionInterface.register(PROBE, _probe_attention(sink))
    before = config._attn_implementation
    config._attn_implementation = PROBE
    try:
        yield
    finally:
        config._attn_implementation = before


def value_hessians(mixer: torch.nn.Module, inputs: list[torch.Tensor],
                   kwargs: list[dict[str, Any]], n_heads: int, n_kv_heads: int,
                   weights: list[torch.Tensor] | None = None) -> HeadHessians:
    """``H_g [n_kv_heads, hidden, hidden]`` (float32) for the value projection of the attention
    ``mixer`` from its (normalized) ``inputs`` per micro-batch, scaled as the input Hessian is
    (``2/n`` over the ``n`` tokens seen). ``weights`` (``[b, t, 1]`` per micro-batch) scale
    each query position's mix ``z_q`` — a norm after the branch counts position ``q``'s error
    by ``1/rms_q²`` (``pipeline.post_norm_weights``)."""
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} attention heads do not split into {n_kv_heads} kv heads")
    hidden = inputs[0].shape[-1]
    acc = torch.zeros(n_kv_heads, hidden, hidden, dtype=torch.float64,
                      device=inputs[0].device)
    seen = 0
    current: dict[str, torch.Tensor] = {}
    per_group = n_heads // n_kv_heads

    def sink(probs: torch.Tensor) -> None:  # probs [b, heads, t, t]; one sequence and group
        x = current["x"].float()            # at a time bounds the [heads/kv, t, hidden] mix
        for b in range(x.shape[0]):
            for g in range(n_kv_heads):
                z = torch.matmul(probs[b, g * per_group:(g + 1) * per_group].float(), x[b])
                if "w" in current:
                    z = z * current["w"][b].float()
                z = z.reshape(-1, hidden)
                acc[g].add_((z.T @ z).double())

    with probing(mixer.config, sink), torch.inference_mode():
        for i, (x, kw) in enumerate(zip(inputs, kwargs)):
            current["x"] = x
            if weights is not None:
                current["w"] = weights[i]
            mixer(x, **kw)
            seen += x.shape[0] * x.shape[1]
    return HeadHessians((acc * (2.0 / max(seen, 1))).float())
