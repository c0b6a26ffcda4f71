"""Segment trigger for streaming speech output (the authors' rule, from their inference code).

s_t = cos(h_t, W_lm[period]) for the hidden state h_t that produced token t. At step t the
trigger judges c = t − delay: it cuts the segment [start, c] when s_c is the maximum of s over
[c − window, c + window] and either c − start ≥ max_len, or s_c > threshold and
c − start ≥ min_len. Whatever is left is flushed at EOS.

`SegmentTrigger` is the streaming form (explicit state, one score at a time);
`segment_boundaries` runs it over a whole sequence (training: cut responses the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from echox.config import TriggerConfig


@dataclass
class SegmentTrigger:
    cfg: TriggerConfig
    scores: list[float] = field(default_factory=list)
    start: int = 0  # first token of the open segment
    cuts: list[tuple[int, int]] = field(default_factory=list)  # closed [start, end) ranges

    def push(self, score: float) -> tuple[int, int] | None:
        """Add the score of the newest token; return a closed [start, end) segment or None."""
        self.scores.append(float(score))
        c = len(self.scores) - 1 - self.cfg.delay
        if c < self.start:
            return None
        s = self.scores
        lo, hi = max(0, c - self.cfg.window), c + self.cfg.window
        if s[c] < max(s[lo:hi + 1]):
            return None
        length = c - self.start
        if length >= self.cfg.max_len or (s[c] > self.cfg.threshold and length >= self.cfg.min_len):
            seg = (self.start, c + 1)
            self.start = c + 1
            self.cuts.append(seg)
            return seg
        return None

    def flush(self) -> tuple[int, int] | None:
        """At EOS: the rest, if any."""
        n = len(self.scores)
        if self.start >= n:
            return None
        seg = (self.start, n)
        self.start = n
        self.cuts.append(seg)
        return seg


def segment_boundaries(scores: list[float], cfg: TriggerConfig) -> list[tuple[int, int]]:
    """All segments the streaming trigger would produce for this score sequence."""
    trig = SegmentTrigger(cfg)
    for s in scores:
        trig.push(s)
    trig.flush()
    return trig.cuts


def trigger_scores(hidden: torch.Tensor, head_row: torch.Tensor) -> list[float]:
    """hidden [n, D] (states that produced each token), head_row [D] -> cosine per token."""
    if hidden.shape[0] == 0:
        return []
    return F.cosine_similarity(hidden.float(), head_row.float()[None, :], dim=-1).tolist()
