"""Soundwave-style speech adapter: pair-concat projection, CTC head, CTC shrink and look-back.

Module and parameter names (`mm_projector1`, `asr_transformer_encoder`, `out_norm`,
`audio_feature_head`, `lbm`, `atten_layer_norm`) follow the released EchoX checkpoints so that
their weights map one to one (see `echox.convert`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from echox.errors import ConfigError


@dataclass
class ShrinkResult:
    keep: torch.Tensor  # [N, T] bool, frames that survive the shrink
    index: torch.Tensor  # [N, S] long, frame index of each kept frame (0 where padded)
    lengths: torch.Tensor  # [N] number of kept frames


def shrink_mask(
    argmax: torch.Tensor, valid: torch.Tensor, blank_id: int, drop_blank: bool = False
) -> torch.Tensor:
    """One frame per run of equal CTC argmax tokens; optionally drop the blank runs.

    argmax, valid: [N, T]. Frame t is kept when it is valid and its token differs from frame
    t-1 (frame 0 always starts a run). With `drop_blank`, runs of the blank token are dropped;
    an utterance left with no frame keeps its first frame so that it is never empty.
    """
    new_run = torch.ones_like(valid)
    new_run[:, 1:] = argmax[:, 1:] != argmax[:, :-1]
    keep = new_run & valid
    if drop_blank:
        keep = keep & (argmax != blank_id)
        empty = keep.sum(dim=1) == 0
        if empty.any():
            keep[empty, 0] = valid[empty, 0]
    return keep


def gather_kept(keep: torch.Tensor) -> ShrinkResult:
    """Indices of kept frames, left-aligned and padded: a batched, order-preserving gather."""
    lengths = keep.sum(dim=1)  # [N]
    s = int(lengths.max().item()) if keep.numel() else 0
    t = keep.shape[1]
    # Sort key: kept frames first, in time order. In int64: an int8 key wrapped for T > 127
    # frames (over 5.1 s of speech) and picked dropped frames instead of kept ones.
    order = torch.argsort((~keep).to(torch.long) * t + torch.arange(t, device=keep.device), dim=1)
    index = order[:, :s]
    pad = torch.arange(s, device=keep.device)[None, :] >= lengths[:, None]
    index = index.masked_fill(pad, 0)
    return ShrinkResult(keep=keep, index=index, lengths=lengths)


@dataclass
class AdapterOutput:
    embeds: torch.Tensor  # [N, S, D] shrunk speech embeddings for the LLM (padded)
    lengths: torch.Tensor  # [N] valid shrunk frames
    ctc_logits: torch.Tensor  # [N, T, V] CTC logits over the LLM vocabulary (or its ctc_columns)
    frame_lengths: torch.Tensor  # [N] valid frames after pair-concat (CTC input lengths)


class SpeechAdapter(nn.Module):
    def __init__(
        self,
        d_whisper: int,
        d_llm: int,
        vocab_size: int,
        blank_id: int,
        num_heads: int = 8,
        ffn_mult: int = 2,
        dropout: float = 0.0,
        lookback_dropout: float = 0.1,
        drop_blank: bool = False,
        trainable: bool = True,
        tied_head: nn.Module | None = None,
        blank_head: bool = False,
        lookback_keys: str = "kept",
        encoder_attention: str = "frames",
        shrink: bool = True,
        ctc_vocab: int = 0,
        extra_layers: int = 0,
        shrink_blank_penalty: float = 0.0,
    ) -> None:
        super().__init__()
        if d_llm % num_heads:  # a setting: one line, as the config's own checks
            raise ConfigError(f"adapter.num_heads={num_heads} does not divide the LLM width {d_llm}")
        if lookback_keys not in ("kept", "all"):
            raise ValueError(f"lookback_keys must be 'kept' or 'all', got {lookback_keys!r}")
        if encoder_attention not in ("frames", "self"):
            raise ValueError(f"encoder_attention must be 'frames' or 'self', got {encoder_attention!r}")
        self.blank_id = blank_id
        self.drop_blank = drop_blank
        if shrink_blank_penalty < 0:
            raise ValueError(f"shrink_blank_penalty must be >= 0, got {shrink_blank_penalty}")
        self.shrink_blank_penalty = float(shrink_blank_penalty)
        self.shrink = shrink
        self.encoder_attention = encoder_attention
        self.lookback_keys = lookback_keys
        self.trainable = trainable
        # `ctc_vocab` > 0: the CTC softmax runs over that many token ids (`ctc_columns`, a
        # buffer saved with the weights; the blank among them) instead of the whole vocabulary
        self.ctc_vocab = ctc_vocab
        if ctc_vocab:
            if ctc_vocab < 2:
                raise ValueError(f"adapter.ctc_vocab={ctc_vocab}: the blank and at least one token")
            cols = torch.arange(ctc_vocab, dtype=torch.long)  # placeholder ids until
            if blank_id >= ctc_vocab:  # `set_ctc_columns` or a checkpoint sets them
                cols[-1] = blank_id
            self.register_buffer("ctc_columns", cols)
        self.mm_projector1 = nn.Linear(2 * d_whisper, d_llm)
        self.asr_transformer_encoder = nn.TransformerEncoderLayer(
            d_llm, num_heads, dim_feedforward=ffn_mult * d_llm, dropout=dropout,
            batch_first=True, norm_first=True,
        )
        # More Transformer layers over the frames (ours; the authors' adapter has the one above).
        # Their residual branches start at zero, so an adapter grown from a trained one computes
        # what it did until they learn (`EchoX.reconfigure_adapter` keeps every other weight).
        self.extra_layers = nn.ModuleList()
        for _ in range(extra_layers):
            layer = nn.TransformerEncoderLayer(
                d_llm, num_heads, dim_feedforward=ffn_mult * d_llm, dropout=dropout,
                batch_first=True, norm_first=True,
            )
            for lin in (layer.self_attn.out_proj, layer.linear2):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
            self.extra_layers.append(layer)
        self.out_norm = nn.LayerNorm(d_llm)
        if tied_head is None:
            self.audio_feature_head = nn.Linear(d_llm, ctc_vocab or vocab_size, bias=False)
        else:  # the LLM's frozen output embeddings; kept out of this module's parameters
            self.audio_feature_head = None
            self._tied = [tied_head]
        # A frozen tied head cannot learn its blank row (the placeholder's embedding): with
        # `blank_head`, the blank logit comes from a small trainable Linear instead.
        self.blank_head = nn.Linear(d_llm, 1) if blank_head else None
        self.lbm = nn.MultiheadAttention(d_llm, num_heads, dropout=lookback_dropout, batch_first=True)
        self.atten_layer_norm = nn.LayerNorm(d_llm)
        self.requires_grad_(trainable)

    def set_ctc_columns(self, token_ids: list[int] | torch.Tensor) -> None:
        """The token ids of a restricted CTC vocabulary (`ctc_vocab` of them, the blank included)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if not self.ctc_vocab or ids.numel() != self.ctc_vocab:
            raise ValueError(f"set_ctc_columns: {ids.numel()} ids for an adapter with ctc_vocab={self.ctc_vocab}")
        if ids.unique().numel() != ids.numel() or not bool((ids == self.blank_id).any()):
            raise ValueError("set_ctc_columns: the ids must be distinct and include the blank")
        self.ctc_columns.copy_(ids.to(self.ctc_columns.device))

    @property
    def ctc_blank(self) -> int:
        """The blank's index among the CTC logits."""
        if not self.ctc_vocab:
            return self.blank_id
        hit = torch.nonzero(self.ctc_columns == self.blank_id).flatten()
        if hit.numel() != 1:
            raise ValueError("the adapter's CTC columns do not hold the blank once")
        return int(hit[0])

    def ctc_token_ids(self, index: torch.Tensor) -> torch.Tensor:
        """CTC logit indices (e.g. an argmax) -> LLM token ids."""
        return self.ctc_columns[index] if self.ctc_vocab else index

    def ctc_target_index(self, targets: torch.Tensor, ignore: int) -> torch.Tensor:
        """Transcript token ids [N, S] (padded with `ignore`) -> CTC logit indices, left-aligned;
        tokens outside a restricted vocabulary are left out of the target."""
        if not self.ctc_vocab:
            return targets
        top = max(int(self.ctc_columns.max()), int(targets.max()) if targets.numel() else 0)
        lookup = torch.full((top + 1,), -1, dtype=torch.long, device=targets.device)
        lookup[self.ctc_columns.to(targets.device)] = torch.arange(self.ctc_vocab, device=targets.device)
        idx = torch.where(targets >= 0, lookup[targets.clamp_min(0)], torch.full_like(targets, -1))
        sh = gather_kept(idx >= 0)  # the mapped tokens of each row, left-aligned
        out = torch.full_like(targets, ignore)
        out[:, : sh.index.shape[1]] = torch.gather(idx, 1, sh.index)
        pad = torch.arange(out.shape[1], device=out.device)[None, :] >= sh.lengths[:, None]
        return out.masked_fill(pad, ignore)

    def ctc_head(self, feats: torch.Tensor) -> torch.Tensor:
        """CTC logits [..., V] over the LLM vocabulary, or [..., ctc_vocab] over `ctc_columns`."""
        if self.audio_feature_head is not None:
            logits = self.audio_feature_head(feats)
        else:
            w = self._tied[0].weight
            if self.ctc_vocab:
                w = w.index_select(0, self.ctc_columns.to(w.device))
            logits = feats.to(w.dtype) @ w.T
        if self.blank_head is not None:
            b = self.ctc_blank
            blank = self.blank_head(feats.to(self.blank_head.weight.dtype)).squeeze(-1)
            onehot = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
            onehot[b] = 1.0
            logits = logits + (blank.to(logits.dtype) - logits[..., b])[..., None] * onehot
        return logits

    def shrink_argmax(self, ctc_logits: torch.Tensor) -> torch.Tensor:
        """Each frame's CTC argmax [N, T] as the shrink reads it: with the blank's logit lowered
        by `shrink_blank_penalty` (0: the plain argmax)."""
        if not self.shrink_blank_penalty:
            return ctc_logits.argmax(-1)
        b = self.ctc_blank
        logits = ctc_logits.clone()
        logits[..., b] -= self.shrink_blank_penalty
        return logits.argmax(-1)

    def forward(self, enc: torch.Tensor, enc_lengths: torch.Tensor | None) -> AdapterOutput:
        """enc: [N, T_w, d_w] Whisper output; enc_lengths: [N] valid frames (None = all)."""
        n, t_w, d_w = enc.shape
        t = t_w // 2
        if enc_lengths is None:
            frame_lengths = torch.full((n,), t, dtype=torch.long, device=enc.device)
        else:
            frame_lengths = torch.div(enc_lengths + 1, 2, rounding_mode="floor").clamp(1, t)
            t = int(frame_lengths.max())  # frames past the longest speech are never used
        x = enc[:, : 2 * t].reshape(n, t, 2 * d_w)  # [N, T, 2*d_w] adjacent frame pairs
        x = self.mm_projector1(x.to(self.mm_projector1.weight.dtype))  # [N, T, D]
        valid = torch.arange(t, device=enc.device)[None, :] < frame_lengths[:, None]  # [N, T]
        if self.encoder_attention == "self":
            # The released checkpoints' layer (sequence-first, given one turn at a time as
            # [1, T, D]): each frame's only key is itself, so its attention
            # output is out_proj(v_proj(.)) of the frame alone. A diagonal mask computes exactly
            # that; no frame reads another, so padding needs no mask here.
            eye = torch.eye(t, dtype=torch.bool, device=enc.device)
            x = self.asr_transformer_encoder(x, src_mask=~eye)
        else:
            x = self.asr_transformer_encoder(x, src_key_padding_mask=~valid)
        for layer in self.extra_layers:
            x = layer(x, src_key_padding_mask=~valid)
        feats = self.out_norm(x)  # [N, T, D] = F
        ctc_logits = self.ctc_head(feats)  # [N, T, V]

        if self.shrink:
            keep = shrink_mask(self.shrink_argmax(ctc_logits), valid, self.ctc_blank, self.drop_blank)
        else:  # the no-shrink baseline: every valid frame is a query
            keep = valid
        sh = gather_kept(keep)
        idx = sh.index[..., None].expand(-1, -1, feats.shape[-1])
        queries = torch.gather(feats, 1, idx)  # [N, S, D]
        # Look-back: kept frames attend to the kept frames of F ("kept"), or to every valid
        # frame of F ("all"), so that frames the shrink dropped can still pass on what they heard.
        keys = keep if self.lookback_keys == "kept" else valid
        attn, _ = self.lbm(queries, feats, feats, key_padding_mask=~keys, need_weights=False)
        embeds = self.atten_layer_norm(queries + attn)  # [N, S, D]
        qpad = torch.arange(embeds.shape[1], device=enc.device)[None, :] >= sh.lengths[:, None]
        embeds = embeds.masked_fill(qpad[..., None], 0.0)
        return AdapterOutput(embeds, sh.lengths, ctc_logits, frame_lengths)
