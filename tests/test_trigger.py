"""The segment trigger on hand-made score sequences, one rule at a time."""

from echox.config import TriggerConfig
from echox.model.trigger import SegmentTrigger, segment_boundaries

CFG = TriggerConfig(delay=5, window=5, max_len=50, min_len=20, threshold=0.1)


def _scores(n, peaks=None, base=0.0):
    s = [base] * n
    for i, v in (peaks or {}).items():
        s[i] = v
    return s


def test_no_cut_before_min_len_even_with_high_peak():
    s = _scores(40, {10: 0.9})  # segment length 10 < 20
    assert segment_boundaries(s, CFG) == [(0, 40)]  # only the EOS flush


def test_cut_at_peak_above_threshold_after_min_len():
    s = _scores(60, {25: 0.5})
    assert segment_boundaries(s, CFG) == [(0, 26), (26, 60)]


def test_peak_below_threshold_needs_max_len():
    s = _scores(80, {25: 0.05, 55: 0.05})
    # 25 - 0 >= 20 but 0.05 <= 0.1: no cut; 55 - 0 >= 50 and a local max: cut
    assert segment_boundaries(s, CFG) == [(0, 56), (56, 80)]


def test_must_be_local_maximum_within_window():
    s = _scores(60, {25: 0.5, 28: 0.6})  # 25 is beaten by 28 within ±5
    assert segment_boundaries(s, CFG) == [(0, 29), (29, 60)]


def test_flat_scores_cut_at_max_len():
    s = _scores(120, base=0.0)  # every point ties as a local max; cut when length reaches 50
    assert segment_boundaries(s, CFG) == [(0, 51), (51, 102), (102, 120)]


def test_decision_is_delayed_by_five_tokens():
    trig = SegmentTrigger(CFG)
    s = _scores(40, {25: 0.5})
    out = [trig.push(v) for v in s]
    first = next(i for i, o in enumerate(out) if o is not None)
    assert first == 30 and out[30] == (0, 26)  # judged at t = c + 5
    assert trig.flush() == (26, 40)
    assert trig.flush() is None


def test_no_flush_of_empty_tail():
    trig = SegmentTrigger(CFG)
    assert trig.flush() is None
