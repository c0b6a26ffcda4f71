"""EchoX losses as pure functions.

- S2T: cross-entropy on the response + 0.3 · CTC on the question transcript (authors' weight).
- T2C and echo: cross-entropy on unit positions (labels already aligned by the unit decoder).
- Denoising: 1 − cos(Adapter(H_i), Emb(X′_i)), averaged over response tokens.
- Stage III total: L_echo + λ·L_den + L_S2T, with λ optionally capped so that the cosine term
  is at most `cap`·L_echo (the authors' code uses 0.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from echox.model.prompt import IGNORE


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, L, V], labels [B, L] on input positions; shifts by one inside."""
    return aligned_ce_loss(logits[:, :-1], labels[:, 1:])


def aligned_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE where labels[i] is already the target of logits[i]; IGNORE positions skipped."""
    if not bool((labels != IGNORE).any()):
        return logits.sum() * 0.0  # keeps the graph alive for DDP
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE
    )


def ctc_loss(
    ctc_logits: torch.Tensor,
    frame_lengths: torch.Tensor,
    targets: torch.Tensor,
    blank_id: int,
) -> torch.Tensor:
    """ctc_logits [N, T, V]; targets [N, S] token ids padded with IGNORE (rows of all IGNORE
    are skipped: audio without a transcript)."""
    tgt_len = (targets != IGNORE).sum(-1)
    rows = tgt_len > 0
    if not bool(rows.any()):
        return ctc_logits.sum() * 0.0
    logp = ctc_logits[rows].float().log_softmax(-1).transpose(0, 1)  # [T, N', V]
    tg = targets[rows]
    flat = tg[tg != IGNORE]
    return F.ctc_loss(
        logp, flat, frame_lengths[rows], tgt_len[rows], blank=blank_id,
        reduction="mean", zero_infinity=True,
    )


def denoise_loss(pred: torch.Tensor, target: torch.Tensor, segments: int | None = None) -> torch.Tensor:
    """pred, target [N, D] (the N tokens of `segments` echo segments, concatenated) ->
    1 - cos(pred_i, target_i) summed over the tokens and averaged over the segments: the
    paper's L_den = Σ_i (1 − cos(Adapter(H_i), Emb(X'_i))) per segment, as the authors'
    code reduces it (`.sum(-1).mean()` over padded segments). `segments=None` averages over
    the tokens instead (`loss.den_reduction: mean`, what EchoX-Tiny v1-v5 trained with). The
    target is the frozen text embedding."""
    if pred.shape[0] == 0:
        return pred.sum() * 0.0
    cost = 1.0 - F.cosine_similarity(pred.float(), target.detach().float(), dim=-1)
    return cost.mean() if segments is None else cost.sum() / max(int(segments), 1)


@dataclass
class Stage3Loss:
    total: torch.Tensor
    lam: float  # the λ actually applied


def stage3_total(
    l_echo: torch.Tensor,
    l_den: torch.Tensor,
    l_s2t: torch.Tensor,
    lam: float,
    cap: float | None = 0.2,
) -> Stage3Loss:
    """L = L_echo + λ·L_den + L_S2T; with `cap`, λ·L_den ≤ cap·L_echo (λ treated as a constant)."""
    eff = lam
    if cap is not None:
        den = float(l_den.detach())
        if den > 0:
            eff = min(lam, cap * float(l_echo.detach()) / den)
    return Stage3Loss(l_echo + eff * l_den + l_s2t, eff)


def guided_attention_loss(
    attentions: tuple[torch.Tensor, ...] | list[torch.Tensor],
    spans: list[tuple[int, int, int, int]],
    heads: int = 0,
    sigma: float = 0.2,
) -> torch.Tensor:
    """Guided attention (Tachibana et al., 2017, "Efficiently Trainable Text-to-Speech System
    Based on Deep Convolutional Networks with Guided Attention"), for a decoder-only T2C.

    attentions: per layer [B, H, L, L] attention probabilities. spans[b] = (cond_start,
    cond_len, query_start, query_len): row b's condition keys and the unit queries that should
    read them in order. Each query's attention over the condition keys is renormalised, and
    its mass at relative distance d = |j/J − k/K| from the diagonal costs 1 − exp(−d²/2σ²).
    Only the first `heads` heads of each layer are guided (0 = all); the others, and the mass
    on earlier units, stay free. Returns the mean cost per (layer, head, query) in [0, 1).
    """
    if not attentions or not spans:
        raise ValueError("guided_attention_loss: no attention maps or no rows")
    if sigma <= 0:
        raise ValueError(f"guided_attention_loss: sigma must be > 0, got {sigma}")
    costs = []
    for b, (c0, nc, q0, nq) in enumerate(spans):
        if nc <= 0 or nq <= 0:
            continue
        dev = attentions[0].device
        k = (torch.arange(nc, device=dev, dtype=torch.float32) + 0.5) / nc
        j = (torch.arange(nq, device=dev, dtype=torch.float32) + 0.5) / nq
        w = 1.0 - torch.exp(-((j[:, None] - k[None, :]) ** 2) / (2.0 * sigma * sigma))  # [nq, nc]
        for a in attentions:
            h = a.shape[1] if heads <= 0 else min(heads, a.shape[1])
            p = a[b, :h, q0:q0 + nq, c0:c0 + nc].float()  # [h, nq, nc]
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-8)
            costs.append((p * w).sum(-1).reshape(-1))
    if not costs:
        return attentions[0].sum() * 0.0
    return torch.cat(costs).mean()
