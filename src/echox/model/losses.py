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


def denoise_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target [N, D] -> mean(1 - cos). The target is the frozen text embedding."""
    if pred.shape[0] == 0:
        return pred.sum() * 0.0
    return (1.0 - F.cosine_similarity(pred.float(), target.detach().float(), dim=-1)).mean()


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
