import math

import pytest
import torch
from conftest import noise

from echox.model.generation import SamplingConfig, sample_next
from echox.model.prompt import Turn


def _dialogues():
    return [
        [Turn("user", audio=noise(0.6, 5))],
        [Turn("user", text="Tell me a fact."), Turn("assistant", text="Sure."),
         Turn("user", audio=noise(1.4, 6))],
    ]


def test_kv_cached_greedy_equals_uncached(make_model):
    m = make_model()
    m.eval()
    s = SamplingConfig(max_new_tokens=12)
    a = m.generate_text(_dialogues(), s, use_cache=True)
    b = m.generate_text(_dialogues(), s, use_cache=False)
    assert a.token_ids == b.token_ids
    assert all(len(t) > 0 for t in a.token_ids)
    for ha, hb, t in zip(a.hidden, b.hidden, a.token_ids):
        assert ha.shape == (len(t), m.llm.hidden_size)
        torch.testing.assert_close(ha, hb, rtol=1e-4, atol=1e-5)


def test_hidden_state_is_the_one_that_produced_the_token(make_model):
    m = make_model()
    m.eval()
    g = m.generate_text(_dialogues()[:1], SamplingConfig(max_new_tokens=6))
    head = m.llm.base.get_output_embeddings().weight
    logits = g.hidden[0] @ head.T
    assert logits.argmax(-1).tolist() == g.token_ids[0]


def test_unit_decoder_cached_equals_uncached(make_model):
    m = make_model()
    m.eval()
    cond = [torch.randn(5, m.llm.hidden_size), torch.randn(9, m.llm.hidden_size)]
    s = SamplingConfig(max_new_tokens=15)
    a = m.t2c.generate(cond, s, use_cache=True)
    b = m.t2c.generate(cond, s, use_cache=False)
    assert a == b and all(len(x) > 0 for x in a)
    assert all(0 <= u < m.t2c.num_units for x in a for u in x)
    assert m.echo.generate(cond, s) == a  # the echo decoder starts as a copy of the T2C
    echoed = m.units_from_hidden(cond, s)  # through the denoising adapter
    assert len(echoed) == 2 and all(0 <= u < m.echo.num_units for x in echoed for u in x)
    from_text = m.units_from_text(["hello", "a longer sentence"], s)
    assert len(from_text) == 2 and all(len(x) > 0 for x in from_text)


def test_default_unit_budget_of_a_row_does_not_depend_on_its_batch(make_model):
    """Greedy rows decode in one batch; a row that never stops gets its own condition's budget
    (it had the longest row's: 112 units in a batch against 40 alone)."""
    m = make_model()
    m.eval()
    def no_eos(module, inputs, out):  # no row stops
        out[..., m.echo.eos_id] = -1e9
        return out
    m.echo.lm_head.register_forward_hook(no_eos)
    assert m.echo.cfg.beams == 1
    cond = [torch.randn(n, m.llm.hidden_size) for n in (2, 6)]
    alone = [m.echo.generate([c])[0] for c in cond]
    batch = m.echo.generate(cond)
    assert [len(u) for u in alone] == [m.echo.default_sampling(len(c)).max_new_tokens for c in cond]
    assert len(alone[0]) < len(alone[1])
    assert batch == alone


def test_decoding_ends_where_the_positions_do(make_model):
    """An explicit max_new_tokens ran past the LLM's positions and the unit decoder's
    (max_new_tokens=10**6: 17 GB and no end); a prompt longer than the LLM's was taken."""
    from echox.errors import PromptError, UnitError

    m = make_model()
    m.eval()
    limit, room = m.llm_positions, m.t2c.cfg.max_positions
    assert limit == m.llm.model.config.max_position_embeddings
    big = SamplingConfig(max_new_tokens=10**6)
    d = [[Turn("user", text="hello")]]
    n = m.embed_inputs(m.collate(d, add_generation_prompt=True), padding_side="left")[0] \
        .inputs_embeds.shape[1]
    g = m.generate_text(d, big)
    assert 0 < len(g.token_ids[0]) <= limit - n
    with pytest.raises(PromptError, match=f"the prompt is .* positions, over the LLM's {limit}"):
        m.generate_text([[Turn("user", text="word " * limit)]], SamplingConfig(max_new_tokens=4))
    cond = [torch.randn(5, m.llm.hidden_size)]
    units = m.t2c.generate(cond, big)  # the row is the condition and two specials
    assert 0 < len(units[0]) <= room - (5 + 2)
    assert list(m.t2c.iter_generate(cond[0], big)) == units[0]  # streamed: the same cut
    beams = SamplingConfig(max_new_tokens=10**6, num_beams=2)
    assert len(m.t2c.generate(cond, beams)[0]) <= room - 7
    with pytest.raises(UnitError, match=f"leaves no room for units in the decoder's {room}"):
        m.units_from_hidden([torch.randn(room, m.llm.hidden_size)], SamplingConfig(max_new_tokens=4))


def test_sampling_seeded_and_top_p():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    a = [int(sample_next(logits, 1.0, 1.0, g1)) for _ in range(20)]
    b = [int(sample_next(logits, 1.0, 1.0, g2)) for _ in range(20)]
    assert a == b
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, 0.5, g)) for _ in range(50)}
    assert picks == {1}  # top-p 0.5 keeps only the best token here
    assert int(sample_next(logits, 0.0, 1.0, None)) == 1


def test_cache_argument_follows_the_model():
    """transformers >= 5.24 takes the KV cache as `cache`; older releases as `past_key_values`."""
    from dataclasses import dataclass

    from echox.model.generation import cache_kwargs, output_cache

    class New(torch.nn.Module):
        def forward(self, inputs_embeds=None, cache=None, use_cache=None):  # noqa: ANN001
            return None

    class Old(torch.nn.Module):
        def forward(self, inputs_embeds=None, past_key_values=None, use_cache=None):  # noqa: ANN001
            return None

    class Wrapped(torch.nn.Module):  # a PEFT model forwards **kwargs to the model it wraps
        def get_base_model(self):  # noqa: ANN201
            return Old()

    c = object()
    assert cache_kwargs(New(), c) == {"cache": c}
    assert cache_kwargs(Old(), c) == {"past_key_values": c}
    assert cache_kwargs(Wrapped(), c) == {"past_key_values": c}

    @dataclass
    class NewOut:
        cache: object = None

    @dataclass
    class OldOut:
        past_key_values: object = None

    assert output_cache(NewOut(c)) is c and output_cache(OldOut(c)) is c


def test_installed_transformers_takes_cache(make_model):
    """The installed transformers gets the name it wants (a deprecated one fails the suite)."""
    import transformers
    from packaging.version import Version

    from echox.model.generation import cache_kwargs

    name = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    m = make_model()  # the LLM wrapped in LoRA (PEFT), the T2C a bare LlamaModel
    assert list(cache_kwargs(m.llm.model, None)) == [name]
    assert list(cache_kwargs(m.t2c.model, None)) == [name]


def test_stopped_rows_leave_the_batch_and_the_cache():
    """`decode` drops a row once it has stopped: later steps run on the others only, and each
    row's tokens are unchanged (row i here stops at step r_i)."""
    from echox.model.generation import SamplingConfig, decode

    vocab, dim, stop = 5, 4, 4

    class Cache:  # the one method decode needs of a KV cache
        def __init__(self, r: torch.Tensor) -> None:
            self.r = r

        def batch_select_indices(self, keep: torch.Tensor) -> None:
            self.r = self.r[keep]

    prefix = torch.zeros(3, 2, dim)
    prefix[:, 0, 0] = torch.tensor([1.0, 3.0, 2.0])  # r: the step at which each row stops
    sizes = []

    def step(inp, mask, pos, cache):  # type: ignore[no-untyped-def]
        cache = cache or Cache(inp[:, 0, 0].clone())
        b, n = inp.shape[0], mask.shape[1] - prefix.shape[1] + 1  # this is step n
        sizes.append(b)
        logits = torch.zeros(b, inp.shape[1], vocab)
        logits[:, -1, 1] = 1.0
        logits[cache.r <= n, -1, stop] = 2.0
        return logits, torch.zeros(b, inp.shape[1], dim), cache

    res = decode(step, lambda ids: torch.zeros(*ids.shape, dim), prefix, torch.ones(3, 2),
                 [stop], SamplingConfig(temperature=0.0, max_new_tokens=10))
    assert res.tokens == [[], [1, 1], [1]] and res.stopped == [True, True, True]
    assert sizes == [3, 2, 1]


def test_shared_prompt_prefix_runs_once_with_the_same_answers(make_model):
    """generate_text runs the tokens all rows start with (system prompt, template) once and
    each row's own inputs after its padding: the tokens and states are those of the plain
    left-padded prefill of every row's whole prompt."""
    from echox.model.echox import shared_prefix_length
    from echox.model.generation import decode

    m = make_model()
    m.eval()
    dialogues = [_dialogues()[0], [Turn("user", audio=noise(1.1, 7))], _dialogues()[1]]
    s = SamplingConfig(max_new_tokens=12)
    batch = m.collate(dialogues, add_generation_prompt=True)
    p = shared_prefix_length(batch.input_ids, batch.attention_mask, m.llm.audio_token_id)
    assert p > 0  # the chat template's start at least
    merged, _ = m.embed_inputs(batch, padding_side="left")
    with torch.no_grad():
        plain = decode(m._llm_step, m.llm.embed, merged.inputs_embeds, merged.attention_mask,
                       m.llm.stop_ids, s, suppress_ids=m.llm.added_token_ids)
    calls = []
    step = m._llm_step
    m._llm_step = lambda e, *a: calls.append(e.shape) or step(e, *a)
    got = m.generate_text(dialogues, s)
    assert got.token_ids == plain.tokens
    for a, b in zip(got.hidden, plain.hidden):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert calls[0] == (1, p, m.llm.hidden_size)  # the shared tokens: one row, once
    assert calls[1][0] == 3 and calls[1][1] == merged.inputs_embeds.shape[1] - p


def test_shared_prefix_length_rules():
    from echox.model.echox import shared_prefix_length

    ids = torch.tensor([[1, 2, 3, 9, 5, 0], [1, 2, 3, 4, 0, 0], [1, 2, 7, 4, 4, 4]])
    mask = (ids != 0).long()
    assert shared_prefix_length(ids, mask, audio_token_id=99) == 2
    assert shared_prefix_length(ids[:2], mask[:2], audio_token_id=99) == 3  # row 1: 4 tokens
    assert shared_prefix_length(ids[:2], mask[:2], audio_token_id=3) == 2  # stops at audio
    assert shared_prefix_length(ids[1:2], mask[1:2], audio_token_id=99) == 3  # keeps one own
    one = torch.tensor([[1, 0]])
    assert shared_prefix_length(one, (one != 0).long(), audio_token_id=99) == 0


def _toy_chain(probs=None):
    """A toy next-token table (tokens 0, 1; 2 stops; row 3 is the start): the logits depend on
    the last input only. The default: greedy takes 0 first (0.6), but every continuation
    after 0 is worth at most 1/3; 1 then stop is worth 0.4 x 0.99."""
    table = torch.log(torch.tensor(probs or [
        [1 / 3, 1 / 3, 1 / 3],  # after 0
        [0.005, 0.005, 0.99],  # after 1
        [1 / 3, 1 / 3, 1 / 3],  # (after a stop: never fed)
        [0.6, 0.4, 1e-9],  # after the start
    ]))
    dim = table.shape[0]

    class Cache:
        def __init__(self, b: int) -> None:
            self.b = b

        def batch_select_indices(self, keep: torch.Tensor) -> None:
            self.b = keep.numel()

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(ids, dim).float()

    def step(inp, mask, pos, cache):  # type: ignore[no-untyped-def]
        assert cache is None or cache.b == inp.shape[0]
        last = inp[:, -1].argmax(-1)  # [B]
        logits = table[last][:, None].expand(-1, inp.shape[1], -1).clone()
        return logits, torch.zeros(inp.shape[0], inp.shape[1], dim), Cache(inp.shape[0])

    def score(seq: list[int]) -> float:  # summed log-prob of seq + stop
        prev, s = 3, 0.0
        for t in [*seq, 2]:
            s += float(table[prev, t])
            prev = t
        return s

    start = embed(torch.tensor([[3]]))  # [1, 1, D]
    return step, embed, start, score, math


def beam_search(step, embed, prefix, stop_ids, sampling, use_cache=True):  # type: ignore[no-untyped-def]
    """One prefix [1, L, D], searched to its end."""
    from echox.model.generation import beam_results, beam_search_steps

    mask = torch.ones(prefix.shape[:2], dtype=torch.long)
    return beam_results(beam_search_steps(step, embed, prefix, mask, stop_ids, [sampling], use_cache))[0]


def test_beam_search_finds_what_greedy_misses():
    from itertools import product

    from echox.model.generation import decode

    step, embed, start, score, _ = _toy_chain()
    s = SamplingConfig(max_new_tokens=4)
    greedy = decode(step, embed, start, torch.ones(1, 1), [2], s).tokens[0]
    assert greedy[0] == 0
    # every sequence of up to 3 tokens (the 4th step can only stop), raw scores (penalty 0)
    best = max((list(p) for n in range(4) for p in product([0, 1], repeat=n)), key=score)
    assert best == [1]
    for use_cache in (True, False):
        one = beam_search(step, embed, start, [2], SamplingConfig(max_new_tokens=4),
                          use_cache=use_cache)
        assert one.tokens == greedy  # one beam is greedy decoding
        two = beam_search(step, embed, start, [2],
                          SamplingConfig(max_new_tokens=4, num_beams=2, length_penalty=0.0),
                          use_cache=use_cache)
        assert two.tokens == best and two.stopped
        assert abs(two.score - score(best)) < 1e-5


def test_beam_search_of_rows_in_one_batch_equals_each_row_alone():
    """Left-padded rows of different lengths and budgets: each gets what it gets alone, and a
    row that ends leaves the batch while the others go on."""
    from echox.model.generation import beam_results, beam_search_steps

    step, embed, start, _, _ = _toy_chain()
    short = start  # [1, 1, D]: the start state
    long_ = embed(torch.tensor([[3, 0, 1]]))  # ends after a 1: stops at once
    x = torch.cat([torch.cat([torch.zeros_like(start), torch.zeros_like(start), short], 1), long_])
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    cfgs = [SamplingConfig(max_new_tokens=4, num_beams=2, length_penalty=0.0),
            SamplingConfig(max_new_tokens=2, num_beams=3)]
    for use_cache in (True, False):
        both = beam_results(beam_search_steps(step, embed, x, mask, [2], cfgs, use_cache=use_cache))
        alone = [beam_search(step, embed, short, [2], cfgs[0], use_cache=use_cache),
                 beam_search(step, embed, long_, [2], cfgs[1], use_cache=use_cache)]
        assert [r.tokens for r in both] == [r.tokens for r in alone] == [[1], []]
        assert all(abs(a.score - b.score) < 1e-5 for a, b in zip(both, alone))


def test_streamed_beam_tokens_come_before_the_search_ends():
    """`iter_beam_tokens` yields a token once every hypothesis starts with it: here both beams
    go through 0 (0.98) before they part (0.6 / 0.4) and stop, so 0 comes out a step before
    the search ends, and the tokens are the search's result."""
    from echox.model.generation import iter_beam_tokens

    step, embed, start, _, _ = _toy_chain([
        [0.0, 0.6, 0.4, 1e-9, 0.0],  # after 0: 1 or 2
        [1e-9, 0.005, 0.005, 0.99, 0.0],  # after 1: stop
        [1e-9, 0.005, 0.005, 0.99, 0.0],  # after 2: stop
        [1 / 4] * 4 + [0.0],  # (after a stop)
        [0.98, 0.01, 0.01, 1e-9, 0.0],  # the start
    ])
    start = embed(torch.tensor([[4]]))
    calls = []

    def counted(*a):  # type: ignore[no-untyped-def]
        calls.append(1)
        return step(*a)

    s = SamplingConfig(max_new_tokens=6, num_beams=2)
    seen = []
    for tok in iter_beam_tokens(counted, embed, start, [3], s):
        seen.append((tok, len(calls)))
    total = len(calls)
    assert [t for t, _ in seen] == beam_search(step, embed, start, [3], s).tokens == [0, 1]
    assert seen[0][1] < total  # 0 was out before the last model call


def test_beam_search_without_a_stop_returns_the_best_open_hypothesis():
    step, embed, start, score, _ = _toy_chain()
    res = beam_search(step, embed, start, [], SamplingConfig(max_new_tokens=3, num_beams=2))
    assert not res.stopped
    # no stop token, so 2 is an ordinary token: 0 1 2 (0.6 x 1/3 x 0.99) is the best of all
    # 27 sequences of three, above the greedy 0 0 0 and the 1 2 x that leads after two tokens
    assert res.tokens == [0, 1, 2]
    assert res.score == pytest.approx(math.log(0.6 / 3 * 0.99), rel=1e-5)


def test_beam_settings_are_checked():
    with pytest.raises(ValueError, match="num_beams"):
        SamplingConfig(num_beams=0)
    with pytest.raises(ValueError, match="temperature 0"):
        SamplingConfig(num_beams=2, temperature=0.7)


def test_unit_decoders_beam_search_from_their_config(make_model):
    """`t2c.beams` > 1: both decoders search by default; cached == uncached, stream == full,
    and one row alone == the same row in a batch."""
    m = make_model()
    m.eval()
    cond = [torch.randn(5, m.llm.hidden_size), torch.randn(9, m.llm.hidden_size)]
    greedy = m.t2c.generate(cond)
    for dec in (m.t2c, m.echo):
        dec.cfg.beams = 3  # both read the same T2CConfig
    s = m.t2c.default_sampling(9)
    assert s.num_beams == 3 and s.temperature == 0
    a = m.t2c.generate(cond)
    assert a == m.t2c.generate(cond, use_cache=False)
    assert a == [m.t2c.generate([c])[0] for c in cond]
    assert list(m.t2c.iter_generate(cond[1])) == a[1]
    assert all(0 <= u < m.t2c.num_units for x in a for u in x)
    assert m.echo.generate(cond) == a  # the echo decoder starts as a copy of the T2C
    assert [m.t2c.generate([c], SamplingConfig(max_new_tokens=m.t2c.default_sampling(len(c)).max_new_tokens))[0]
            for c in cond] == greedy  # greedy by default before: each row with its own budget


def _repeats(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def test_repetition_guard_rules():
    from echox.model.generation import banned_ngram_tokens, guard_repetition

    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]  # "1 2 3" exists; "1 2" is the tail
    assert banned_ngram_tokens([1, 2, 3, 1, 2, 4, 1, 2], 3) == [3, 4]
    assert banned_ngram_tokens([5, 6, 5], 2) == [6]
    assert banned_ngram_tokens([5, 6, 5], 1) == [5, 6]
    assert banned_ngram_tokens([5, 6, 5], 0) == [] and banned_ngram_tokens([5, 6], 3) == []
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    cfgs = [SamplingConfig(repetition_penalty=2.0), SamplingConfig(no_repeat_ngram_size=2)]
    guard_repetition(logits, [[0, 1, 0], [3, 2, 3]], cfgs)
    # row 0: seen 0 and 1: a positive logit halves, a negative one doubles (CTRL's rule)
    assert logits[0].tolist() == [1.0, -2.0, 0.5, 3.0]
    # row 1: "3 2" was said, the tail is 3, so 2 is banned
    assert logits[1, 2] == float("-inf") and logits[1, [0, 1, 3]].tolist() == [2.0, -1.0, 3.0]
    # a ban that would leave no token at all is lifted (here n = 1 over the whole vocabulary)
    full = torch.tensor([[0.5, 0.25, -0.75]])
    guard_repetition(full, [[0, 1, 2]], [SamplingConfig(no_repeat_ngram_size=1)])
    assert full.tolist() == [[0.5, 0.25, -0.75]]
    with pytest.raises(ValueError, match="histories"):
        guard_repetition(full, [], [SamplingConfig(no_repeat_ngram_size=1)])
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingConfig(repetition_penalty=0.0)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        SamplingConfig(no_repeat_ngram_size=-1)


def test_no_repeat_ngram_greedy_text(make_model):
    """A tiny random LLM loops; the guard stops every repeated bigram, with or without the KV
    cache, and a row in a batch gets what it gets alone."""
    m = make_model()
    m.eval()
    free = m.generate_text(_dialogues(), SamplingConfig(max_new_tokens=40))
    assert any(_repeats(t, 2) for t in free.token_ids)  # the guard has work to do
    s = SamplingConfig(max_new_tokens=40, no_repeat_ngram_size=2)
    a = m.generate_text(_dialogues(), s, use_cache=True)
    b = m.generate_text(_dialogues(), s, use_cache=False)
    assert a.token_ids == b.token_ids
    assert a.token_ids != free.token_ids
    assert not any(_repeats(t, 2) for t in a.token_ids)
    alone = [m.generate_text([d], s).token_ids[0] for d in _dialogues()]
    assert alone == a.token_ids
    p = m.generate_text(_dialogues(), SamplingConfig(max_new_tokens=40, repetition_penalty=5.0))
    assert p.token_ids != free.token_ids


def test_guarded_rows_keep_their_histories_when_one_leaves_the_batch(make_model):
    """Row 0 is made to stop early (one of its tokens becomes a stop token): the rows left in
    the batch keep their own histories, so each still gets what it gets alone."""
    m = make_model()
    m.eval()
    s = SamplingConfig(max_new_tokens=30, repetition_penalty=5.0)
    rows = m.generate_text(_dialogues(), s).token_ids
    k = next(k for k in range(2, 20) if rows[0][k] not in rows[0][:k] and rows[0][k] not in rows[1][:k + 2])
    gen = m.llm.base.generation_config
    gen.eos_token_id = [*m.llm.stop_ids, rows[0][k]]
    both = m.generate_text(_dialogues(), s)
    alone = [m.generate_text([d], s).token_ids[0] for d in _dialogues()]
    assert both.token_ids == alone
    assert both.stopped[0] and len(both.token_ids[0]) == k  # row 0 left the batch at step k
    assert len(both.token_ids[1]) > k + 1  # row 1 went on without it


def test_beam_search_with_no_repeat_ngram():
    from echox.model.generation import beam_results, beam_search_steps

    step, embed, start, _, _ = _toy_chain([
        [0.7, 0.2, 0.1],  # after 0: 0 again
        [0.6, 0.3, 0.1],
        [0.3, 0.6, 0.1],
        [0.9, 0.05, 0.05],  # the start
    ])
    free = beam_search(step, embed, start, [], SamplingConfig(max_new_tokens=3, num_beams=2))
    assert free.tokens == [0, 0, 0]
    s = SamplingConfig(max_new_tokens=3, num_beams=2, no_repeat_ngram_size=1)
    one = beam_search(step, embed, start, [], s)
    assert sorted(one.tokens) == [0, 1, 2]  # three different tokens: none may come twice
    x = torch.cat([start, start])
    both = beam_results(beam_search_steps(step, embed, x, torch.ones(2, 1), [], [s, s]))
    assert [r.tokens for r in both] == [one.tokens, one.tokens]


# ---- text answers by beam search -------------------------------------------------------------


def test_text_beam_search_of_one_beam_is_greedy_with_its_hidden_states(make_model, monkeypatch):
    """One beam is greedy: `beam_decode` gives greedy's tokens, and its teacher-forced pass
    gives the states greedy recorded (the shared prefix, left padding of the prompts and right
    padding of the answers all in play)."""
    import echox.model.echox as echox_mod
    from echox.model.generation import beam_decode

    m = make_model()
    m.eval()
    greedy = m.generate_text(_dialogues(), SamplingConfig(max_new_tokens=10))
    calls = []

    def through_beams(*a, **kw):  # generate_text's own call, answered by beam_decode instead
        calls.append(a[5])
        return beam_decode(*a, **kw)

    monkeypatch.setattr(echox_mod, "decode", through_beams)
    beams = m.generate_text(_dialogues(), SamplingConfig(max_new_tokens=10))
    assert len(calls) == 1 and calls[0].num_beams == 1
    assert beams.token_ids == greedy.token_ids and beams.stopped == greedy.stopped
    for hb, hg, t in zip(beams.hidden, greedy.hidden, greedy.token_ids):
        assert hb.shape == hg.shape == (len(t), m.llm.hidden_size)
        torch.testing.assert_close(hb, hg, rtol=1e-4, atol=1e-4)


def _answer_logprob(m, ids: list[int], hidden: torch.Tensor) -> float:
    """The summed log-probability of an answer, from the states that produced its tokens."""
    logits = (hidden @ m.llm.base.get_output_embeddings().weight.T).float()
    logits[:, m.llm.added_token_ids] = float("-inf")  # generation suppresses them
    return float(torch.log_softmax(logits, -1)[torch.arange(len(ids)), ids].sum())


def test_text_beam_search_rows_in_a_batch_equal_rows_alone(make_model):
    m = make_model()
    m.eval()
    s = SamplingConfig(max_new_tokens=10, num_beams=3)
    together = m.generate_text(_dialogues(), s)
    alone = [m.generate_text([d], s) for d in _dialogues()]
    assert together.token_ids == [a.token_ids[0] for a in alone]
    for i, a in enumerate(alone):
        assert together.hidden[i].shape == (len(a.token_ids[0]), m.llm.hidden_size)
        torch.testing.assert_close(together.hidden[i], a.hidden[0], rtol=1e-4, atol=1e-4)
    # this random model never stops within 10 tokens, so each answer is the likeliest of the
    # search's last beams: here likelier than greedy's, which the search did not keep
    greedy = m.generate_text(_dialogues(), SamplingConfig(max_new_tokens=10))
    assert not any(together.stopped) and not any(greedy.stopped)
    assert together.token_ids != greedy.token_ids
    for b_ids, b_h, g_ids, g_h in zip(together.token_ids, together.hidden, greedy.token_ids, greedy.hidden):
        assert _answer_logprob(m, b_ids, b_h) >= _answer_logprob(m, g_ids, g_h) - 1e-4


def test_sampling_values_that_would_fail_mid_decode_are_refused():
    """NaN/inf temperatures crashed torch.multinomial, a float n-gram size a slice, a string
    seed the generator; a float max_new_tokens ran one step more than asked."""

    from echox.errors import ConfigError

    for bad in ({"temperature": float("nan")}, {"temperature": float("inf")},
                {"length_penalty": float("nan")}, {"repetition_penalty": float("inf")},
                {"max_new_tokens": 2.5}, {"max_new_tokens": "4"}, {"num_beams": 2.5},
                {"no_repeat_ngram_size": 1.5}, {"seed": "x"}, {"max_new_tokens": True}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SamplingConfig(**bad)
    SamplingConfig(max_new_tokens=3, temperature=1, top_p=1, seed=0)  # ints for floats are fine


def test_generate_text_refuses_bad_dialogues(make_model):
    from echox.errors import ConfigError, PromptError

    m = make_model()
    m.eval()
    s = SamplingConfig(max_new_tokens=2)
    user = Turn("user", text="hi")
    for dialogues, match in (([], "non-empty list of dialogues"),  # was a torch RuntimeError
                             ([[]], "but it is empty"),
                             ([[user, Turn("assistant", text="Hello.")]], "not an assistant turn"),
                             ([user], "must be a list of Turns"),
                             ([[{"role": "user", "content": "hi"}]], "must be a list of Turns")):
        with pytest.raises(PromptError, match=match):
            m.generate_text(dialogues, s)
    with pytest.raises(ConfigError, match="SamplingConfig"):
        m.generate_text([[user]], {"max_new_tokens": 2})


def test_units_from_hidden_and_text_refuse_bad_input(make_model):
    from echox.errors import PromptError, UnitError

    m = make_model()
    m.eval()
    d = m.llm.hidden_size
    s = SamplingConfig(max_new_tokens=2)
    nan = torch.full((3, d), float("nan"))
    for hidden, match in (([], "non-empty list"), ([torch.randn(0, d)], r"\(0, 32\)"),
                          ([torch.randn(3, d + 1)], r"\(3, 33\)"),  # was a matmul error
                          ([torch.ones(3, d, dtype=torch.long)], "int64"),
                          ([torch.randn(3, d).numpy()], "ndarray"),
                          ([nan], "NaN or inf")):  # NaN states gave units 0, 0, 0, ...
        with pytest.raises(UnitError, match=match):
            m.units_from_hidden(hidden, s)
    with pytest.raises(UnitError, match="NaN or inf"):
        list(m.iter_units_from_hidden(nan, s))
    for texts in ([], [""], "hello", [None]):  # "hello" gave one answer per character
        with pytest.raises(PromptError, match="non-empty list of non-empty strings"):
            m.units_from_text(texts, s)


def test_a_tiny_temperature_samples_the_top_token_and_beams_are_bounded():
    """temperature 1e-300 divided the logits into inf - inf: NaN probabilities, a RuntimeError
    in chat and a 500 for every turn in serve; 10**11 beams were killed for memory."""

    from echox.errors import ConfigError

    logits = torch.tensor([[1.0, 3.0, 2.0], [-5.0, -7.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 1e-300, 0.9, g).tolist() == [1, 2]
    with pytest.raises(ConfigError, match="num_beams must be in"):
        SamplingConfig(num_beams=10**11)


def test_nan_scores_are_named_not_sampled():
    """Weights damaged in place (same size, NaN bytes) gave NaN logits: greedy decoding
    silently took the NaN's index, sampling failed in torch.multinomial mid-answer."""
    from echox.errors import CheckpointError

    logits = torch.tensor([[0.1, float("nan"), 0.3]])
    for temperature in (0.0, 0.7):
        with pytest.raises(CheckpointError, match="next-token scores are NaN"):
            sample_next(logits, temperature, 1.0, None)
    assert sample_next(torch.tensor([[0.1, float("-inf"), 0.3]]), 0.0, 1.0, None).tolist() == [2]
