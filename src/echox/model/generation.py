"""Autoregressive decoding shared by the LLM (text) and the unit decoders (T2C / echo).

One loop, with or without a KV cache, greedy or temperature + top-p. It returns, for every
generated token, the last-layer hidden state that produced it: the streaming trigger and the
echo decoder read those. `iter_decode` / `decode_step` expose the loop one step at a time,
with its state (`DecodeState`, KV cache included) held by the caller; `decode` runs it whole.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from echox.config import MAX_BEAMS
from echox.errors import CheckpointError, ConfigError

# step(inputs_embeds [B, L, D], attention_mask [B, L'], position_ids [B, L], cache)
#   -> (logits [B, L, V], hidden [B, L, H], cache)
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor, Any]]
EmbedFn = Callable[[torch.Tensor], torch.Tensor]  # ids [B, 1] -> [B, 1, D]


# ---- the KV cache argument of a transformers model -----------------------------------------
# transformers 5.24 renamed the forward argument and output field `past_key_values` to `cache`;
# the old name still works there with a FutureWarning and goes in 5.40. These two helpers
# speak whichever name the installed model takes, so no call of ours uses a deprecated name.


@functools.lru_cache(maxsize=None)
def _cache_arg(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters  # follows transformers' decorators
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """`{name: cache}` for `model(...)`, under the name its forward takes a KV cache by.

    `model` is a transformers model; a PEFT wrapper is looked through to the model it wraps."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_arg(type(base)): cache}


def output_cache(out: Any) -> Any:
    """The KV cache a transformers model output carries (`cache`, or `past_key_values` before
    transformers 5.24); None when it carries none."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    return getattr(out, "cache" if "cache" in fields else "past_key_values", None)


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    # > 1: beam search (deterministic; temperature must be 0). A hypothesis is scored by its
    # summed log-probability over (tokens + 1 for the stop token) ** length_penalty.
    num_beams: int = 1
    length_penalty: float = 1.0
    # Repetition guards over the answer's own tokens (transformers counts the prompt's too).
    # repetition_penalty > 1 lowers a generated token's logit (divided by it when positive,
    # multiplied when negative: CTRL's rule, on the logits as transformers' greedy and sampled
    # decoding apply it; beam search applies it to the logits too, before the softmax);
    # no_repeat_ngram_size = n > 0 forbids any n-gram from occurring twice. Off by default.
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "num_beams", "no_repeat_ngram_size", "seed"):
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        for name in ("temperature", "top_p", "length_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**63:  # torch seeds to 2**64; the
            # engine adds each segment's index to it
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.num_beams <= MAX_BEAMS:
            raise ConfigError(f"num_beams must be in [1, {MAX_BEAMS}], got {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise ConfigError("beam search is deterministic: use temperature 0 with num_beams > 1")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")

    @property
    def guards_repetition(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0


@dataclass
class DecodeResult:
    tokens: list[list[int]]  # generated ids per row, without the stop token
    hidden: list[torch.Tensor]  # per row [n_i, H]: the state that produced each token
    stopped: list[bool] = field(default_factory=list)  # True when a stop token ended the row


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [B, V] -> ids [B]. Greedy when temperature == 0."""
    if torch.isnan(logits).any():  # argmax would pick the NaN, multinomial fail mid-answer
        raise CheckpointError("the model's next-token scores are NaN: damaged weights (a corrupt "
                              "weights file whose size is right), or an overflow in this dtype "
                              "(try float32)")
    if temperature <= 0:
        return logits.argmax(-1)
    # the top logit at 0 first, in float64 (a float32 temperature of 1e-300 is 0): a tiny
    # temperature then gives the others -inf, not NaN
    logits = logits.double()
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1).float()
    if top_p < 1.0:
        sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, sorted_i, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


def banned_ngram_tokens(history: list[int], n: int) -> list[int]:
    """The tokens that would complete an n-gram already in `history` (none when n == 0)."""
    if n <= 0 or len(history) < n:
        return []
    if n == 1:
        return sorted(set(history))
    tail = history[len(history) - n + 1:]
    return sorted({history[k + n - 1] for k in range(len(history) - n + 1)
                   if history[k:k + n - 1] == tail})


def guard_repetition(logits: torch.Tensor, histories: list[list[int]],
                     configs: list[SamplingConfig]) -> None:
    """Apply each row's repetition guards (`SamplingConfig.repetition_penalty`,
    `no_repeat_ngram_size`) to its logits [B, V] in place; row i has generated `histories[i]`.
    A row the n-gram ban would leave without any allowed token keeps its logits unbanned."""
    if not len(histories) == len(configs) == logits.shape[0]:
        raise ValueError(f"guard_repetition: {logits.shape[0]} rows, {len(histories)} histories, "
                         f"{len(configs)} configs")
    for i, (hist, cfg) in enumerate(zip(histories, configs)):
        if not hist:
            continue
        if cfg.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(hist)), device=logits.device)
            v = logits[i, seen]
            logits[i, seen] = torch.where(v > 0, v / cfg.repetition_penalty, v * cfg.repetition_penalty)
        banned = banned_ngram_tokens(hist, cfg.no_repeat_ngram_size)
        if banned:
            before = logits[i, banned].clone()
            logits[i, banned] = float("-inf")
            if bool(torch.isneginf(logits[i]).all()):
                logits[i, banned] = before


@dataclass
class DecodeState:
    """Everything one decode loop carries between steps, held by the caller (explicit state:
    the streaming engine's session owns it, KV cache included)."""

    mask: torch.Tensor  # [B, L'] attention mask of all inputs so far
    pos_all: torch.Tensor  # [B, L'] position ids of all inputs so far
    embeds: torch.Tensor  # [B, L', D] all inputs so far (the uncached path re-reads them)
    inp: torch.Tensor  # [B, l, D] what the next step feeds: the prefix, then one token
    pos: torch.Tensor  # [B, l]
    done: torch.Tensor  # [B] bool: the row has hit a stop token
    stop: torch.Tensor  # [S] stop ids
    generator: torch.Generator | None = None
    cache: Any = None  # the model's KV cache (None before the first step / uncached)
    pending: torch.Tensor | None = None  # [B] ids sampled last step, not yet fed back
    steps: int = 0
    history: list[list[int]] = field(default_factory=list)  # per row: the ids fed back so far

    @property
    def prefix_len(self) -> int:
        """Input positions (prefix + fed-back tokens) so far."""
        return int(self.mask.shape[1])


@dataclass
class DecodeStep:
    """One step of `iter_decode` for a batch of B rows."""

    index: int  # 0-based step number
    ids: torch.Tensor  # [B] sampled ids (meaningless for rows in `finished`)
    hidden: torch.Tensor  # [B, H] the last-layer state that produced `ids`
    stopped: torch.Tensor  # [B] bool: this step sampled a stop token for a live row
    finished: torch.Tensor  # [B] bool: the row had stopped before this step

    @property
    def emitted(self) -> torch.Tensor:
        """[B] bool: rows whose `ids` is a real generated token."""
        return ~(self.stopped | self.finished)


def with_shared(prefix_embeds: torch.Tensor, prefix_mask: torch.Tensor,
                shared: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prefixes [B, L, D] / [B, L] with `shared` [1, P, D] put before every row's
    padding: [shared][padding][prefix] and its mask (long)."""
    mask = prefix_mask.long()
    if shared is None:
        return prefix_embeds, mask
    b = prefix_embeds.shape[0]
    return (torch.cat([shared.to(prefix_embeds.dtype).expand(b, -1, -1), prefix_embeds], dim=1),
            torch.cat([mask.new_ones(b, shared.shape[1]), mask], dim=1))


def start_decode(
    prefix_embeds: torch.Tensor, prefix_mask: torch.Tensor, stop_ids: list[int],
    sampling: SamplingConfig, shared: torch.Tensor | None = None, cache: Any = None,
) -> DecodeState:
    """The state before the first step, for left-padded prefixes [B, L, D] / [B, L].

    `shared` [1, P, D]: inputs every row starts with, before its left padding (the layout is
    [shared][padding][prefix]; positions count valid inputs only, so a row's positions are
    those of its inputs without the padding). `cache`: the KV cache of `shared` already
    expanded to B rows (`prefill_shared`); the first step then runs on `prefix_embeds` only.
    """
    b, device = prefix_embeds.shape[0], prefix_embeds.device
    gen = None
    if sampling.seed is not None and sampling.temperature > 0:
        gen = torch.Generator(device=device).manual_seed(sampling.seed)
    embeds, mask = with_shared(prefix_embeds, prefix_mask, shared)
    p = 0 if shared is None else shared.shape[1]
    pos_all = (mask.cumsum(-1) - 1).clamp(min=0)
    inp, pos = embeds, pos_all
    if cache is not None:
        if shared is None:
            raise ValueError("start_decode: a cache without the shared inputs it holds")
        inp, pos = prefix_embeds, pos_all[:, p:]
    return DecodeState(
        mask=mask, pos_all=pos_all, embeds=embeds, inp=inp, pos=pos,
        done=torch.zeros(b, dtype=torch.bool, device=device),
        stop=torch.tensor(stop_ids, device=device, dtype=torch.long), generator=gen, cache=cache,
        history=[[] for _ in range(b)],
    )


@torch.no_grad()
def prefill_shared(step: StepFn, shared: torch.Tensor, rows: int) -> Any:
    """The KV cache of `shared` [1, P, D] computed once and repeated for `rows` rows, or None
    when the model's cache cannot be repeated (then `decode` runs the shared inputs per row)."""
    p = shared.shape[1]
    mask = torch.ones(1, p, dtype=torch.long, device=shared.device)
    pos = torch.arange(p, device=shared.device)[None]
    _, _, cache = step(shared, mask, pos, None)
    if rows > 1:
        repeat = getattr(cache, "batch_repeat_interleave", None)
        if repeat is None:
            return None
        repeat(rows)
    return cache


@torch.no_grad()
def decode_step(
    step: StepFn, embed: EmbedFn, state: DecodeState, sampling: SamplingConfig,
    use_cache: bool = True, suppress_ids: list[int] | None = None,
) -> DecodeStep:
    """Feed back the previous step's ids (if any), run the model once, sample. Updates `state`."""
    b = state.mask.shape[0]
    if state.pending is not None:  # append the last sampled token to the inputs
        new_emb = embed(state.pending[:, None]).to(state.embeds.dtype)  # [B, 1, D]
        state.mask = torch.cat([state.mask, state.mask.new_ones(b, 1)], dim=1)
        new_pos = state.pos_all[:, -1:] + 1
        state.pos_all = torch.cat([state.pos_all, new_pos], dim=1)
        state.embeds = torch.cat([state.embeds, new_emb], dim=1)
        state.inp, state.pos = new_emb, new_pos
        for row, tok in zip(state.history, state.pending.tolist()):
            row.append(tok)
        state.pending = None
    if use_cache:
        logits, hidden, state.cache = step(state.inp, state.mask, state.pos, state.cache)
    else:
        logits, hidden, _ = step(state.embeds, state.mask, state.pos_all, None)
    last_logits = logits[:, -1].float()  # [B, V]
    if suppress_ids:
        last_logits[:, suppress_ids] = float("-inf")
    if sampling.guards_repetition:
        guard_repetition(last_logits, state.history, [sampling] * b)
    nxt = sample_next(last_logits, sampling.temperature, sampling.top_p, state.generator)  # [B]
    is_stop = torch.isin(nxt, state.stop) if state.stop.numel() else torch.zeros_like(state.done)
    finished = state.done.clone()
    out = DecodeStep(state.steps, nxt, hidden[:, -1], is_stop & ~finished, finished)
    state.done = state.done | is_stop
    state.pending = nxt
    state.steps += 1
    return out


def iter_decode(
    step: StepFn,
    embed: EmbedFn,
    prefix_embeds: torch.Tensor,
    prefix_mask: torch.Tensor,
    stop_ids: list[int],
    sampling: SamplingConfig,
    use_cache: bool = True,
    suppress_ids: list[int] | None = None,
    state: DecodeState | None = None,
) -> Iterator[DecodeStep]:
    """Generate one step at a time until every row stopped or `max_new_tokens` steps ran.

    Pass `state` (from `start_decode`) to keep the KV cache and masks in the caller's hands.
    """
    state = state or start_decode(prefix_embeds, prefix_mask, stop_ids, sampling)
    while state.steps < sampling.max_new_tokens and not bool(state.done.all()):
        yield decode_step(step, embed, state, sampling, use_cache, suppress_ids)


def keep_rows(state: DecodeState, keep: torch.Tensor) -> bool:
    """Drop every row of `state` but `keep` (indices), KV cache included, so that rows that
    have stopped cost nothing in later steps. False (and `state` unchanged) when the cache
    cannot drop rows."""
    if state.cache is not None:
        select = getattr(state.cache, "batch_select_indices", None)
        if select is None:
            return False
        select(keep)
    for name in ("mask", "pos_all", "embeds", "inp", "pos", "done"):
        setattr(state, name, getattr(state, name)[keep])
    if state.pending is not None:
        state.pending = state.pending[keep]
    state.history = [state.history[j] for j in keep.tolist()]
    return True


@torch.no_grad()
def decode(
    step: StepFn,
    embed: EmbedFn,
    prefix_embeds: torch.Tensor,
    prefix_mask: torch.Tensor,
    stop_ids: list[int],
    sampling: SamplingConfig,
    use_cache: bool = True,
    suppress_ids: list[int] | None = None,
    shared: torch.Tensor | None = None,
) -> DecodeResult:
    """Generate from left-padded prefixes [B, L, D] / [B, L]; all steps at once.

    A row that has stopped leaves the batch (and the KV cache): a batch costs as much as its
    rows still answering, not B times its longest answer. Each row's tokens are those it gets
    alone (rows never see each other; the left padding keeps every row's positions).
    `shared` [1, P, D]: inputs that come before every row's prefix (a system prompt and chat
    template all rows have): with the KV cache they run once, not once per row.
    With `sampling.num_beams > 1` the tokens come from beam search instead (`beam_decode`).
    """
    if sampling.num_beams > 1:
        return beam_decode(step, embed, prefix_embeds, prefix_mask, stop_ids, sampling,
                           use_cache, suppress_ids, shared)
    b = prefix_embeds.shape[0]
    tokens: list[list[int]] = [[] for _ in range(b)]
    hiddens: list[list[torch.Tensor]] = [[] for _ in range(b)]
    stopped = [False] * b
    width = prefix_embeds.shape[-1]
    cache = prefill_shared(step, shared, b) if shared is not None and use_cache else None
    state = start_decode(prefix_embeds, prefix_mask, stop_ids, sampling, shared=shared, cache=cache)
    rows = list(range(b))  # the original index of each row still in `state`
    while state.steps < sampling.max_new_tokens and rows:
        st = decode_step(step, embed, state, sampling, use_cache, suppress_ids)
        width = st.hidden.shape[-1]
        emitted, hit = st.emitted.tolist(), st.stopped.tolist()
        for j, i in enumerate(rows):
            if hit[j]:
                stopped[i] = True
            elif emitted[j]:
                tokens[i].append(int(st.ids[j]))
                hiddens[i].append(st.hidden[j])
        if bool(state.done.any()):
            keep = (~state.done).nonzero().flatten()
            if keep.numel() == 0:
                break
            if keep_rows(state, keep):
                rows = [rows[j] for j in keep.tolist()]
    hidden_out = [torch.stack(h) if h else prefix_embeds.new_zeros(0, width) for h in hiddens]
    return DecodeResult(tokens, hidden_out, stopped)


@torch.no_grad()
def beam_decode(
    step: StepFn,
    embed: EmbedFn,
    prefix_embeds: torch.Tensor,
    prefix_mask: torch.Tensor,
    stop_ids: list[int],
    sampling: SamplingConfig,
    use_cache: bool = True,
    suppress_ids: list[int] | None = None,
    shared: torch.Tensor | None = None,
) -> DecodeResult:
    """`decode` by beam search: each row's best hypothesis (`beam_search_steps`, every row with
    `sampling`), and the hidden state that produced each of its tokens.

    The search keeps no hidden states, so they come from one more pass over each row's prefix
    and answer (teacher-forced, the answers right-padded): the states greedy decoding would
    have recorded had it picked the same tokens, up to float rounding between a cached step
    and a whole pass. `shared` [1, P, D] is put before every row's left padding, as `decode`
    lays it out (here it runs once per row).
    """
    embeds, mask = with_shared(prefix_embeds, prefix_mask, shared)
    results = beam_results(beam_search_steps(step, embed, embeds, mask, stop_ids,
                                             [sampling] * prefix_embeds.shape[0], use_cache, suppress_ids))
    tokens = [r.tokens for r in results]
    n = max(len(t) for t in tokens)
    # as `decode` does, an empty answer's states are [0, D] (no step produced a token)
    hidden = [prefix_embeds.new_zeros(0, prefix_embeds.shape[-1]) for _ in tokens]
    if n:
        ids = torch.tensor([t + [0] * (n - len(t)) for t in tokens], device=embeds.device)  # 0: masked
        ans_mask = torch.tensor([[1] * len(t) + [0] * (n - len(t)) for t in tokens],
                                device=embeds.device, dtype=mask.dtype)
        # the state that produced token i sits where token i - 1 (or the prefix's end) was fed
        full = torch.cat([embeds, embed(ids[:, :-1]).to(embeds.dtype)], dim=1)
        full_mask = torch.cat([mask, ans_mask[:, :-1]], dim=1)
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        _, states, _ = step(full, full_mask, pos, None)
        start = embeds.shape[1] - 1
        hidden = [states[r, start:start + len(t)] if t else states.new_zeros(0, states.shape[-1])
                  for r, t in enumerate(tokens)]
    return DecodeResult(tokens, hidden, [r.stopped for r in results])


@dataclass
class BeamResult:
    tokens: list[int]  # the best hypothesis, without the stop token
    score: float  # its summed log-probability (the stop token's included when `stopped`)
    stopped: bool  # False when it ran to max_new_tokens


@dataclass
class BeamStep:
    """What `beam_search_steps` knows after a step: for each row, the tokens every hypothesis
    still in the running starts with (`settled`: the result will start with them too), and,
    after the last step, the results."""

    settled: list[list[int]]
    results: list[BeamResult] | None = None


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    if not seqs:
        return []
    n = min(len(x) for x in seqs)
    for i in range(n):
        if any(x[i] != seqs[0][i] for x in seqs):
            return seqs[0][:i]
    return seqs[0][:n]


def iter_beam_tokens(
    step: StepFn,
    embed: EmbedFn,
    prefix_embeds: torch.Tensor,
    stop_ids: list[int],
    sampling: SamplingConfig,
    use_cache: bool = True,
    suppress_ids: list[int] | None = None,
) -> Iterator[int]:
    """Beam search (`beam_search_steps`) for one prefix [1, L, D], streamed: each token is
    yielded as soon as every hypothesis still in the running (stopped ones included) starts
    with it, so the tokens are those of the result, in order, most of them before the search
    ends."""
    mask = torch.ones(prefix_embeds.shape[:2], dtype=torch.long, device=prefix_embeds.device)
    sent: list[int] = []
    for st in beam_search_steps(step, embed, prefix_embeds, mask, stop_ids, [sampling],
                                use_cache, suppress_ids):
        toks = st.settled[0]
        if toks[:len(sent)] != sent[:len(toks)]:
            raise RuntimeError("beam search: a settled token changed")  # cannot happen
        for tok in toks[len(sent):]:
            sent.append(tok)
            yield tok


def beam_results(steps: Iterator[BeamStep]) -> list[BeamResult]:
    """Run a `beam_search_steps` search to its end: each row's best hypothesis."""
    last = None
    for last in steps:
        pass
    if last is None or last.results is None:
        raise RuntimeError("beam search: the search yielded no results")
    return last.results


@torch.no_grad()
def beam_search_steps(
    step: StepFn,
    embed: EmbedFn,
    prefix_embeds: torch.Tensor,
    prefix_mask: torch.Tensor,
    stop_ids: list[int],
    sampling: list[SamplingConfig],
    use_cache: bool = True,
    suppress_ids: list[int] | None = None,
) -> Iterator[BeamStep]:
    """Beam search from left-padded prefixes [B, L, D] / [B, L], row i with `sampling[i]`
    (`num_beams`, `length_penalty`, `max_new_tokens`). Each row keeps its hypotheses; each
    step's candidates are their top continuations, and one that picks a stop token is set
    aside with its length-normalised score. A row ends when `num_beams` hypotheses have
    stopped and its best open one, scored at its length now, is no better (the usual
    heuristic), or after its `max_new_tokens` steps; it then leaves the batch.

    All rows' beams run as one batch. With the KV cache (a transformers cache that can select
    rows) each step feeds one token per beam; without it every step re-reads all inputs.
    A `BeamStep` is yielded after every step (the last one carries the results), so a caller
    can stream the tokens all hypotheses agree on before the search ends.
    """
    b, device = prefix_embeds.shape[0], prefix_embeds.device
    if len(sampling) != b:
        raise ValueError(f"beam search: {b} prefixes but {len(sampling)} sampling configs")
    stop = set(stop_ids)

    def norm(r: int, score: float, length: int) -> float:
        return score / float(length) ** sampling[r].length_penalty

    guard = any(c.guards_repetition for c in sampling)

    def logprobs(logits: torch.Tensor, hyps: list[list[int]], owner: list[int]) -> torch.Tensor:
        last = logits[:, -1].float()
        if suppress_ids:
            last[:, suppress_ids] = float("-inf")
        if guard:
            guard_repetition(last, hyps, [sampling[r] for r in owner])
        return torch.log_softmax(last, dim=-1)

    mask = prefix_mask.long()
    pos_all = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, _, cache = step(prefix_embeds, mask, pos_all, None)
    owner = list(range(b))
    hyps: list[list[int]] = [[] for _ in range(b)]
    # [n, V]: batch row j holds hypothesis hyps[j] of row owner[j]
    scores = logprobs(logits, hyps, owner)
    base = torch.zeros(b, device=device)
    next_pos = mask.sum(-1)  # [n] the position of the token each batch row feeds next
    embeds = prefix_embeds
    done: list[list[tuple[float, float, list[int]]]] = [[] for _ in range(b)]
    open_: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]  # the last open beams
    t = 0
    while owner:
        total = (scores + base[:, None]).cpu()
        vocab = total.shape[1]
        src: list[int] = []
        toks: list[int] = []
        new_scores: list[float] = []
        new_owner: list[int] = []
        j = 0
        while j < len(owner):  # each row's beams are contiguous in the batch
            r, k = owner[j], sampling[owner[j]].num_beams
            e = j
            while e < len(owner) and owner[e] == r:
                e += 1
            block = total[j:e]
            top = block.flatten().topk(min(2 * k, block.numel()))
            keep: list[tuple[int, int, float]] = []
            for sc, flat in zip(top.values.tolist(), top.indices.tolist()):
                if sc == float("-inf"):
                    break
                i, tok = divmod(flat, vocab)
                if tok in stop:
                    done[r].append((norm(r, sc, t + 1), sc, hyps[j + i]))
                else:
                    keep.append((j + i, tok, sc))
                if len(keep) == k:
                    break
            open_[r] = [(sc, hyps[i] + [tok]) for i, tok, sc in keep]
            best_done = max((d[0] for d in done[r]), default=float("-inf"))
            ended = (not keep or t + 1 >= sampling[r].max_new_tokens
                     or (len(done[r]) >= k and best_done >= norm(r, max(x[2] for x in keep), t + 2)))
            if not ended:
                for i, tok, sc in keep:
                    src.append(i)
                    toks.append(tok)
                    new_scores.append(sc)
                    new_owner.append(r)
            j = e
        if not src:
            break
        hyps_next = [hyps[i] + [tok] for i, tok in zip(src, toks)]
        yield BeamStep([_common_prefix([h for h, o in zip(hyps_next, new_owner) if o == r]
                                       + [d[2] for d in done[r]]) for r in range(b)])
        src_t = torch.tensor(src, device=device)
        hyps = hyps_next
        owner, base = new_owner, torch.tensor(new_scores, device=device)
        new = embed(torch.tensor(toks, device=device)[:, None]).to(prefix_embeds.dtype)
        mask = torch.cat([mask[src_t], mask.new_ones(len(src), 1)], dim=1)
        next_pos = next_pos[src_t]
        if use_cache:
            select = getattr(cache, "batch_select_indices", None)
            if select is None:
                raise ValueError("beam search: this model's KV cache cannot select rows; "
                                 "use use_cache=False")
            select(src_t)  # repeated indices copy a row: the first step fans each row out
            logits, _, cache = step(new, mask, next_pos[:, None], cache)
        else:
            embeds = torch.cat([embeds[src_t], new], dim=1)
            pos_all = torch.cat([pos_all[src_t], next_pos[:, None]], dim=1)
            logits, _, _ = step(embeds, mask, pos_all, None)
        next_pos = next_pos + 1
        scores = logprobs(logits, hyps, owner)
        t += 1
    out = []
    for r in range(b):
        if done[r]:
            _, raw, toks_r = max(done[r], key=lambda d: d[0])
            out.append(BeamResult(list(toks_r), raw, True))
        elif open_[r]:
            sc, toks_r = max(open_[r], key=lambda o: norm(r, o[0], len(o[1])))
            out.append(BeamResult(toks_r, sc, False))
        else:
            out.append(BeamResult([], 0.0, False))
    yield BeamStep([r.tokens for r in out], out)
