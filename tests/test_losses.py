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
