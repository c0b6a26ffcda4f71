import pytest
import torch

from echox.model import losses
from echox.model.prompt import IGNORE


def test_stage3_total_caps_cosine_term():
    l_echo, l_den, l_s2t = torch.tensor(2.0), torch.tensor(1.0), torch.tensor(0.5)
    capped = losses.stage3_total(l_echo, l_den, l_s2t, lam=1.0, cap=0.2)
    assert capped.lam == pytest.approx(0.4)  # 0.2 * 2.0 / 1.0
    assert float(capped.total) == pytest.approx(2.0 + 0.4 + 0.5)
    fixed = losses.stage3_total(l_echo, l_den, l_s2t, lam=0.1, cap=None)
    assert fixed.lam == 0.1 and float(fixed.total) == pytest.approx(2.6)
    small = losses.stage3_total(l_echo, l_den, l_s2t, lam=0.1, cap=0.2)
    assert small.lam == 0.1  # below the cap: unchanged


def test_denoise_loss_zero_when_aligned_and_two_when_opposite():
    x = torch.randn(5, 8)
    assert float(losses.denoise_loss(x * 3, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.denoise_loss(-x, x)) == pytest.approx(2.0, abs=1e-6)


def test_denoise_loss_sums_over_a_segments_tokens_and_averages_over_segments():
    """The paper's Σ_i per segment (the authors' `.sum(-1).mean()`), and the older mean."""
    torch.manual_seed(0)
    pred, target = torch.randn(7, 8), torch.randn(7, 8)
    cost = [1.0 - float(torch.dot(p, t) / (p.norm() * t.norm())) for p, t in zip(pred, target)]
    # two segments of 3 and 4 tokens: (sum of the 3 + sum of the 4) / 2
    assert float(losses.denoise_loss(pred, target, segments=2)) == pytest.approx(sum(cost) / 2, rel=1e-5)
    assert float(losses.denoise_loss(pred, target)) == pytest.approx(sum(cost) / 7, rel=1e-5)


def test_where_the_cap_binds_both_den_reductions_give_one_gradient():
    torch.manual_seed(1)
    target = torch.randn(6, 8)
    grads = []
    for segments in (2, None):
        pred = torch.randn(6, 8, generator=torch.Generator().manual_seed(2)).requires_grad_()
        den = losses.denoise_loss(pred, target, segments=segments)
        tot = losses.stage3_total(torch.tensor(1.0), den, torch.tensor(0.0), lam=1.0, cap=0.2)
        assert tot.lam < 1.0  # capped in both forms
        tot.total.backward()
        grads.append(pred.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_causal_lm_loss_shifts_labels():
    v = 6
    labels = torch.tensor([[IGNORE, 2, 3]])
    logits = torch.full((1, 3, v), -10.0)
    logits[0, 0, 2] = 10.0  # position 0 predicts label at 1
    logits[0, 1, 3] = 10.0
    assert float(losses.causal_lm_loss(logits, labels)) < 1e-3


def test_ctc_loss_skips_rows_without_transcript():
    torch.manual_seed(0)
    logits = torch.randn(2, 10, 7, requires_grad=True)
    targets = torch.tensor([[1, 2, IGNORE], [IGNORE, IGNORE, IGNORE]])
    l_both = losses.ctc_loss(logits, torch.tensor([10, 10]), targets, blank_id=0)
    l_one = losses.ctc_loss(logits[:1], torch.tensor([10]), targets[:1], blank_id=0)
    assert l_both.item() == pytest.approx(l_one.item())
    none = losses.ctc_loss(logits, torch.tensor([10, 10]), torch.full((2, 3), IGNORE), 0)
    assert none.item() == 0.0
    none.backward()  # graph stays alive


def _attn(p: torch.Tensor, width: int, c0: int, q0: int) -> torch.Tensor:
    """One layer [1, 1, width, width] holding p [nq, nc] at (q0.., c0..)."""
    a = torch.zeros(1, 1, width, width)
    a[0, 0, q0:q0 + p.shape[0], c0:c0 + p.shape[1]] = p
    return a


def test_guided_attention_prefers_the_diagonal():
    nq, nc = 8, 4
    diag = torch.zeros(nq, nc)
    diag[torch.arange(nq), torch.arange(nq) * nc // nq] = 1.0  # reads the text in order
    anti = diag.flip(1)  # reads it backwards
    span = [(1, nc, 6, nq)]
    good = float(losses.guided_attention_loss([_attn(diag, 16, 1, 6)], span))
    bad = float(losses.guided_attention_loss([_attn(anti, 16, 1, 6)], span))
    assert good < 0.05
    assert bad > 0.5
    # mass outside the condition (on earlier units) is free: only the shape over the text counts
    assert float(losses.guided_attention_loss([_attn(diag * 0.1, 16, 1, 6)], span)) == pytest.approx(good)
    # the cost of one query that looks only at key k: 1 - exp(-d^2 / 2 sigma^2)
    one = torch.zeros(1, nc)
    one[0, 3] = 1.0
    d = 3.5 / nc - 0.5
    want = 1 - torch.exp(torch.tensor(-(d**2) / (2 * 0.2**2)))
    got = losses.guided_attention_loss([_attn(one, 8, 1, 6)], [(1, nc, 6, 1)], sigma=0.2)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_guided_attention_guides_only_the_first_heads_and_needs_maps():
    nq, nc = 6, 3
    a = torch.zeros(1, 2, 12, 12)
    a[0, 0, 4:10, 1:4] = torch.eye(nc).repeat_interleave(2, 0)  # head 0: diagonal
    a[0, 1, 4:10, 1:4] = torch.eye(nc).flip(1).repeat_interleave(2, 0)  # head 1: backwards
    span = [(1, nc, 4, nq)]
    first = float(losses.guided_attention_loss([a], span, heads=1))
    both = float(losses.guided_attention_loss([a], span, heads=0))
    assert first < both
    with pytest.raises(ValueError, match="no attention maps"):
        losses.guided_attention_loss([], span)
