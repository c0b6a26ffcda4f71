import pytest
import torch

from echox.model.speech_adapter import SpeechAdapter, gather_kept, shrink_mask

B = 9  # blank id


def _keep(seq, drop_blank, valid_len=None):
    a = torch.tensor([seq])
    valid = torch.zeros_like(a, dtype=torch.bool)
    valid[0, : (valid_len or len(seq))] = True
    return shrink_mask(a, valid, blank_id=B, drop_blank=drop_blank)[0].tolist()


def test_one_frame_per_run_keeps_blank_runs():
    seq = [B, B, 3, 3, 3, B, 4, 4, B, B, 3]
    keep = _keep(seq, drop_blank=False)
    assert [s for s, k in zip(seq, keep) if k] == [B, 3, B, 4, B, 3]
    assert keep[0] and keep[2] and not keep[1]


def test_drop_blank_runs():
    seq = [B, B, 3, 3, 3, B, 4, 4, B, B, 3]
    keep = _keep(seq, drop_blank=True)
    assert [s for s, k in zip(seq, keep) if k] == [3, 4, 3]
    assert [i for i, k in enumerate(keep) if k] == [2, 6, 10]


def test_repeated_token_across_blank_is_two_runs():
    seq = [5, 5, B, 5]
    assert [s for s, k in zip(seq, _keep(seq, False)) if k] == [5, B, 5]
    assert [s for s, k in zip(seq, _keep(seq, True)) if k] == [5, 5]


def test_all_blank_with_drop_keeps_one_frame():
    keep = _keep([B, B, B, B], drop_blank=True)
    assert keep == [True, False, False, False]


def test_padding_is_never_kept():
    seq = [1, 2, 3, 4, 5, 6]
    keep = _keep(seq, drop_blank=False, valid_len=3)
    assert keep == [True, True, True, False, False, False]


def test_gather_kept_batched_order_and_padding():
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    r = gather_kept(keep)
    assert r.lengths.tolist() == [3, 1]
    assert r.index[0].tolist() == [0, 2, 3]
    assert r.index[1].tolist() == [3, 0, 0]  # padded with 0


def test_blank_head_replaces_only_the_tied_blank_logit_and_learns():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False).requires_grad_(False)  # a frozen "LLM head"
    a = SpeechAdapter(6, 16, 40, blank_id=7, num_heads=4, tied_head=head, blank_head=True)
    plain = SpeechAdapter(6, 16, 40, blank_id=7, num_heads=4, tied_head=head)
    feats = torch.randn(2, 5, 16)
    got, ref = a.ctc_head(feats), plain.ctc_head(feats)
    others = [i for i in range(40) if i != 7]
    torch.testing.assert_close(got[..., others], ref[..., others])
    torch.testing.assert_close(got[..., 7], a.blank_head(feats).squeeze(-1))
    got[..., 7].sum().backward()
    assert a.blank_head.weight.grad is not None and a.blank_head.weight.grad.abs().sum() > 0
    assert "blank_head.weight" in dict(a.named_parameters())


def test_lookback_keys_all_lets_dropped_frames_through():
    torch.manual_seed(0)
    kw = dict(num_heads=4, lookback_dropout=0.0)
    kept = SpeechAdapter(6, 16, 40, blank_id=7, lookback_keys="kept", **kw).eval()
    every = SpeechAdapter(6, 16, 40, blank_id=7, lookback_keys="all", **kw).eval()
    every.load_state_dict(kept.state_dict())
    # one token on every frame: the shrink keeps frame 0 only
    one_run = torch.zeros(40)
    one_run[3] = 10.0
    for m in (kept, every):
        m.ctc_head = lambda f: f.new_zeros(*f.shape[:2], 40) + one_run  # noqa: B023
    enc = torch.randn(1, 20, 6)
    lengths = torch.tensor([20])
    a, b = kept(enc, lengths), every(enc, lengths)
    assert a.lengths.tolist() == b.lengths.tolist() == [1]
    seen = {}
    for name, m in (("kept", kept), ("all", every)):
        m.lbm.register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: seen.__setitem__(name, kwargs["key_padding_mask"]),
            with_kwargs=True)
        m(enc, lengths)
    # padding masks: True = not a key. "kept" reads frame 0 only; "all" every valid frame
    assert (~seen["kept"]).sum().item() == 1 and (~seen["all"]).sum().item() == 10
    with pytest.raises(ValueError, match="lookback_keys"):
        SpeechAdapter(6, 16, 40, blank_id=7, lookback_keys="some")


def test_no_shrink_passes_every_valid_frame():
    torch.manual_seed(0)
    a = SpeechAdapter(6, 16, 40, blank_id=7, num_heads=4, lookback_dropout=0.0, shrink=False).eval()
    enc = torch.randn(2, 20, 6)
    out = a(enc, torch.tensor([20, 9]))
    # pair-concat halves the frames: 10 and 5 valid, all of them kept, padding zeroed
    assert out.lengths.tolist() == out.frame_lengths.tolist() == [10, 5]
    assert out.embeds.shape[1] == 10 and out.embeds[1, 5:].abs().sum() == 0
    assert out.embeds[1, :5].abs().sum() > 0


def test_shrink_blank_penalty_keeps_frames_where_the_blank_barely_wins():
    torch.manual_seed(0)
    kw = dict(num_heads=4, lookback_dropout=0.0)
    plain = SpeechAdapter(6, 16, 40, blank_id=7, **kw).eval()
    pen = SpeechAdapter(6, 16, 40, blank_id=7, shrink_blank_penalty=1.0, **kw).eval()
    pen.load_state_dict(plain.state_dict())
    # frames: token 3, blank by 0.5 over token 5, blank by 0.5 over token 5, blank by 3 over token 5
    logits = torch.full((1, 4, 40), -10.0)
    logits[0, 0, 3] = 2.0
    for t, margin in ((1, 0.5), (2, 0.5), (3, 3.0)):
        logits[0, t, 7], logits[0, t, 5] = 1.0 + margin, 1.0
    assert plain.shrink_argmax(logits).tolist() == [[3, 7, 7, 7]]
    assert pen.shrink_argmax(logits).tolist() == [[3, 5, 5, 7]]
    assert pen.shrink_argmax(logits)[0, 3] == 7 and logits[0, 1, 7] == 1.5  # the logits are not changed
    for m in (plain, pen):
        m.ctc_head = lambda f: logits.expand(f.shape[0], -1, -1)  # noqa: B023
    enc = torch.randn(1, 8, 6)
    a, b = plain(enc, torch.tensor([8])), pen(enc, torch.tensor([8]))
    # runs: [3][7 7 7] -> 2 frames; [3][5 5][7] -> 3 frames. The CTC logits (the loss's) are the same
    assert a.lengths.tolist() == [2] and b.lengths.tolist() == [3]
    torch.testing.assert_close(a.ctc_logits, b.ctc_logits)
    with pytest.raises(ValueError, match="shrink_blank_penalty"):
        SpeechAdapter(6, 16, 40, blank_id=7, shrink_blank_penalty=-1.0)
