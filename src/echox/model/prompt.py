"""Prompt assembly: chat template → token ids and labels, then placeholder expansion.

The tokenizer's own chat template renders the dialogue; an audio turn holds one placeholder
token. Labels are found by rendering growing prefixes of the conversation, so any template
works without knowing its markup. `merge_speech` then replaces each placeholder with its
shrunk speech embeddings and shifts labels and masks explicitly, returning the new position
of every original token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from echox.errors import AudioError, PromptError

IGNORE = -100
_SENTINEL = "\ue000echox-turn-content\ue000"  # private-use characters: in no text or template


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    text: str | None = None
    audio: np.ndarray | None = None  # 16 kHz mono float32
    transcript: str | None = None  # text of the audio (CTC target), when known

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise PromptError(f"turn role must be 'user' or 'assistant', got {self.role!r}")
        for name in ("text", "transcript"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise PromptError(f"the {self.role} turn's {name} must be a string, got "
                                  f"{type(value).__name__}")
        if self.text is None and self.audio is None:
            raise PromptError(f"a {self.role} turn needs text or audio")
        if self.role == "assistant" and self.audio is not None and self.text is None:
            raise PromptError("assistant turns need their text (the response)")
        if self.audio is not None:
            check_waveform(self.audio, f"{self.role} turn audio")


def is_unicode(text: str) -> bool:
    """Whether `text` encodes as UTF-8, as every tokenizer needs: a line read from non-UTF-8
    input (surrogate-escaped bytes) or JSON's "\\ud800" does not (a TypeError in the tokenizer)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_waveform(audio: Any, what: str) -> None:
    """Refuse audio that is not float samples [T] (non-empty, finite): `AudioError` naming
    `what`. Integer PCM or other rates and channel layouts go through `echox.audio.load_audio`."""
    try:
        wav = np.asarray(audio)
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. a CUDA tensor, a ragged list
        raise AudioError(f"{what}: not a sample array ({type(audio).__name__}: {e})") from e
    if wav.dtype.kind != "f":
        raise AudioError(f"{what}: expected 16 kHz float samples in [-1, 1], got dtype {wav.dtype} "
                         "(convert other input with echox.audio.load_audio(x, orig_sr=...))")
    if wav.ndim != 1 or wav.size == 0:
        hint = " (mix channels down with echox.audio.load_audio)" if wav.ndim == 2 else ""
        raise AudioError(f"{what}: expected a non-empty mono waveform [T], got shape {wav.shape}"
                         + hint)
    if not np.isfinite(wav).all():
        raise AudioError(f"{what}: audio contains NaN or inf samples")


@dataclass
class EncodedDialogue:
    input_ids: list[int]
    labels: list[int]
    audio: list[np.ndarray] = field(default_factory=list)
    transcripts: list[str | None] = field(default_factory=list)
    # [start, end) token ranges of each assistant turn's content (no template markup)
    response_spans: list[tuple[int, int]] = field(default_factory=list)


class PromptBuilder:
    def __init__(self, tokenizer: Any, system_prompt: str | None, audio_token: str) -> None:
        self.tok = tokenizer
        self.system_prompt = system_prompt
        self.audio_token = audio_token

    def _render(self, msgs: list[dict[str, str]], gen: bool) -> str:
        if not msgs:
            return ""
        try:
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001 - template errors are jinja exceptions of any kind
            raise PromptError(f"chat template failed on {len(msgs)} message(s): {e}") from e

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def _plain_ids(self, text: str) -> list[int]:
        """Token ids of a turn's own text with no special tokens in it: markup such as
        `<|im_end|>` typed by a user is read as characters, so user text cannot end its turn,
        open a system turn or add an audio placeholder."""
        if not text:
            return []
        return self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _content(self, t: Turn) -> str:
        if t.audio is not None and t.role == "user":  # an assistant's audio is no model input
            return self.audio_token if not t.text else f"{self.audio_token}\n{t.text}"
        return t.text or ""

    def _text_span(self, t: Turn, msgs: list[dict[str, str]], full: str, start: int
                   ) -> tuple[int, int] | None:
        """[a, b) of the user turn's typed text in `full` (the rendering that ends with it),
        found by rendering a sentinel in the text's place (the placeholder, if any, stays
        where it is, so a template that lays out audio turns apart renders it the same way):
        the template's markup around it, whatever the text holds (a role name, a piece of
        markup). None when the template does not render the text once and unchanged."""
        probe_turn = Turn("user", text=_SENTINEL, audio=t.audio)
        probe = self._render(msgs[:-1] + [{**msgs[-1], "content": self._content(probe_turn)}], False)
        if probe.count(_SENTINEL) != 1:
            return None
        before, after = probe.split(_SENTINEL)
        if (len(before) < start or len(before) + len(after) > len(full)
                or not full.startswith(before) or not full.endswith(after)):
            return None
        return len(before), len(full) - len(after)

    def encode(self, turns: list[Turn], add_generation_prompt: bool = False) -> EncodedDialogue:
        """Token ids with labels on every assistant turn (content and end-of-turn markup)."""
        msgs: list[dict[str, str]] = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        enc = EncodedDialogue([], [])
        prev = ""

        def add(text: str, labelled: bool, ids: list[int] | None = None) -> tuple[int, int]:
            ids = self._ids(text) if ids is None else ids
            start = len(enc.input_ids)
            enc.input_ids.extend(ids)
            enc.labels.extend(ids if labelled else [IGNORE] * len(ids))
            return start, len(enc.input_ids)

        def step(msgs_now: list[dict[str, str]], gen: bool) -> str:
            text = self._render(msgs_now, gen)
            if not text.startswith(prev):
                raise PromptError(
                    "the chat template does not render conversations incrementally "
                    "(a prefix of the dialogue is not a prefix of its rendering)"
                )
            return text

        if msgs:  # the system turn
            prev = step(msgs, False)
            add(prev, False)
        for t in turns:
            content = self._content(t)
            if t.role == "assistant":
                gen = step(msgs, True)
                msgs.append({"role": "assistant", "content": content})
                full = step(msgs, False)
                if not full.startswith(gen):
                    raise PromptError("rendering with the generation prompt is not a prefix")
                tail = full[len(gen):]
                core = content.strip()
                k = tail.find(core)
                if k < 0:
                    raise PromptError("the assistant content is not found in the rendered turn")
                add(gen[len(prev):] + tail[:k], False)
                enc.response_spans.append(add(core, True, self._plain_ids(core)))
                add(tail[k + len(core):], True)
            else:
                msgs.append({"role": "user", "content": content})
                full = step(msgs, False)
                span = self._text_span(t, msgs, full, len(prev)) if t.text else None
                if span is None:  # no typed text (or a template that hides it): as rendered
                    add(full[len(prev):], False)
                else:  # markup (and the placeholder), then the typed text with no special tokens
                    a, b = span
                    add(full[len(prev):a], False)
                    add(full[a:b], False, self._plain_ids(full[a:b]))
                    add(full[b:], False)
                if t.audio is not None:
                    enc.audio.append(np.asarray(t.audio, dtype=np.float32))
                    enc.transcripts.append(t.transcript)
            prev = full
        if add_generation_prompt:
            gen = step(msgs, True)
            add(gen[len(prev):], False)
        n_ph = enc.input_ids.count(self.tok.convert_tokens_to_ids(self.audio_token))
        if n_ph != len(enc.audio):
            raise PromptError(
                f"{n_ph} audio placeholder tokens for {len(enc.audio)} audio turns: the text of "
                f"a turn must not contain {self.audio_token!r}"
            )
        return enc


@dataclass
class MergedInputs:
    inputs_embeds: torch.Tensor  # [B, L', D]
    attention_mask: torch.Tensor  # [B, L'] long
    labels: torch.Tensor  # [B, L'] (IGNORE on speech, padding and prompt)
    position_ids: torch.Tensor  # [B, L']
    new_index: torch.Tensor  # [B, L] position in L' of each original token (-1: placeholder/pad)
    speech_spans: list[list[tuple[int, int]]]  # per dialogue: [start, end) of each speech block


def merge_speech(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    text_embeds: torch.Tensor,
    speech_embeds: torch.Tensor | None,
    speech_lengths: torch.Tensor | None,
    audio_token_id: int,
    padding_side: str = "right",
) -> MergedInputs:
    """Replace each placeholder with its speech block; shift labels and masks explicitly.

    input_ids, attention_mask, labels: [B, L] (right-padded); text_embeds: [B, L, D];
    speech_embeds: [N, S, D] with speech_lengths [N], consumed in order of appearance
    (dialogue 0's audio turns first).
    """
    b, l = input_ids.shape
    d = text_embeds.shape[-1]
    if labels is None:
        labels = torch.full_like(input_ids, IGNORE)
    n_speech = 0 if speech_embeds is None else speech_embeds.shape[0]
    is_ph = (input_ids == audio_token_id) & attention_mask.bool()
    if int(is_ph.sum()) != n_speech:
        raise PromptError(f"{int(is_ph.sum())} audio placeholders but {n_speech} speech inputs")
    rows_e, rows_l, spans, maps = [], [], [], []
    k = 0
    for i in range(b):
        n_valid = int(attention_mask[i].sum())
        pieces_e, pieces_l, sp = [], [], []
        new_idx = torch.full((l,), -1, dtype=torch.long)
        pos, last = 0, 0
        ph_pos = torch.nonzero(is_ph[i, :n_valid]).flatten().tolist()
        for p in ph_pos + [n_valid]:
            seg = slice(last, p)
            pieces_e.append(text_embeds[i, seg])
            pieces_l.append(labels[i, seg])
            new_idx[last:p] = torch.arange(pos, pos + (p - last))
            pos += p - last
            if p < n_valid:
                s_len = int(speech_lengths[k])
                pieces_e.append(speech_embeds[k, :s_len].to(text_embeds.dtype))
                pieces_l.append(torch.full((s_len,), IGNORE, dtype=labels.dtype, device=labels.device))
                sp.append((pos, pos + s_len))
                pos += s_len
                k += 1
            last = p + 1
        rows_e.append(torch.cat(pieces_e))
        rows_l.append(torch.cat(pieces_l))
        spans.append(sp)
        maps.append(new_idx)
    width = max(r.shape[0] for r in rows_e)
    emb = text_embeds.new_zeros(b, width, d)
    lab = labels.new_full((b, width), IGNORE)
    mask = attention_mask.new_zeros(b, width)
    new_index = torch.stack(maps).to(input_ids.device)
    for i, (e, lb) in enumerate(zip(rows_e, rows_l)):
        n = e.shape[0]
        off = 0 if padding_side == "right" else width - n
        emb[i, off:off + n] = e
        lab[i, off:off + n] = lb
        mask[i, off:off + n] = 1
        if off:
            valid = new_index[i] >= 0
            new_index[i, valid] += off
            spans[i] = [(s + off, e_ + off) for s, e_ in spans[i]]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return MergedInputs(emb, mask, lab, position_ids, new_index, spans)
