"""EchoX: composed from parts — speech encoder, speech adapter, LLM, T2C, denoiser, echo decoder.

No part keeps state between calls: every forward takes a batch and returns an output
dataclass; generation state lives in `echox.model.generation` or the inference engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from echox.config import EchoXConfig, SpeechAdapterConfig, T2CConfig
from echox.errors import AudioError, ConfigError, PromptError, UnitError
from echox.hub import resolve
from echox.model import losses
from echox.model.batch import S2TBatch, T2CBatch, collate_s2t
from echox.model.checkpoint import (check_device, checkpoint_folder, load_checkpoint, parse_dtype,
                                    save_checkpoint)
from echox.model.denoiser import DenoisingAdapter
from echox.model.encoder import (
    HOP,
    LogMelFrontEnd,
    SpeechFeatures,
    WhisperSpeechEncoder,
    check_speech_length,
)
from echox.model.feature_cache import EncoderCache, encoder_fingerprint
from echox.model.generation import DecodeResult, SamplingConfig, decode
from echox.model.llm import LLM, LLMOutput
from echox.model.prompt import IGNORE, MergedInputs, PromptBuilder, Turn, merge_speech
from echox.model.speech_adapter import AdapterOutput, SpeechAdapter
from echox.model.trigger import segment_boundaries, trigger_scores
from echox.model.unit_decoder import UnitDecoder, UnitOutput
from echox.model.unit_decoder_authors import AuthorsUnitDecoder


@dataclass
class S2TOutput:
    logits: torch.Tensor  # [B, K, V] at the K positions that predict a label
    hidden: torch.Tensor  # [B, L', D]
    merged: MergedInputs
    speech: AdapterOutput | None
    loss: torch.Tensor
    ce: torch.Tensor
    ctc: torch.Tensor


@dataclass
class EchoOutput:
    loss: torch.Tensor
    echo: torch.Tensor
    den: torch.Tensor
    s2t: torch.Tensor
    lam: float
    units: UnitOutput
    targets: list[list[int]]  # the pseudo-label (or gold) units trained on


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, float]


@dataclass
class TextGeneration:
    token_ids: list[list[int]]
    texts: list[str]
    hidden: list[torch.Tensor]  # per row [n_i, D]: the state that produced each token
    stopped: list[bool]


class EchoX(nn.Module):
    def __init__(
        self,
        config: EchoXConfig,
        encoder: WhisperSpeechEncoder,
        frontend: LogMelFrontEnd,
        adapter: SpeechAdapter,
        llm: LLM,
        t2c: UnitDecoder,
        echo: UnitDecoder,
        denoiser: DenoisingAdapter,
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.frontend = frontend
        self.adapter = adapter
        self.llm = llm
        self.t2c = t2c
        self.echo = echo
        self.denoiser = denoiser
        self.tokenizer = llm.tokenizer
        self.trained_stages: list[str] = []  # metadata saved with checkpoints
        # parts a loaded checkpoint left out (a slim bundle's T2C): they hold initial weights
        self.omitted_parts: tuple[str, ...] = ()
        # base models the loaded checkpoint folder held itself ({"llm": ("llm", /abs/llm)}):
        # a save carries them along, so that the copy does not lean on the original folder
        self.carried_base: dict[str, tuple[str, Path]] = {}
        self.feature_cache: Any = None  # an EncoderCache, see enable_feature_cache
        self.prompt = PromptBuilder(self.tokenizer, config.llm.system_prompt, config.llm.audio_token)

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def build(cls, config: EchoXConfig, tokenizer: Any | None = None,
              device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "EchoX":
        """Load the base models named in `config` and create fresh trainable parts.

        `device` / `dtype` only concern the LLM here, whose weights are read straight onto the
        device in that dtype; the caller moves the (smaller) other parts after loading theirs
        (`echox.model.checkpoint.load_checkpoint`)."""
        enc_dir = resolve(config.encoder.name_or_path)
        llm_dir = resolve(config.llm.name_or_path)
        encoder = WhisperSpeechEncoder.from_folder(enc_dir, trainable=config.encoder.trainable,
                                                   window_seconds=config.encoder.window_seconds)
        frontend = LogMelFrontEnd(enc_dir, encoder.num_mel_bins, encoder.window_frames)
        with torch.random.fork_rng(devices=[]):  # deterministic: LoRA init included
            torch.manual_seed(config.seed)
            llm = LLM.from_folder(llm_dir, config.llm, tokenizer=tokenizer, device=device, dtype=dtype)
            adapter = _make_adapter(config.adapter, encoder.d_model, llm)
            if config.t2c.layout == "authors":
                t2c = AuthorsUnitDecoder(config.t2c, llm.hidden_size, llm.vocab_size, llm.tokenizer,
                                         llm.base.get_input_embeddings())
                echo = t2c  # one module, as released: the T2C is also the echo decoder
            else:
                t2c = UnitDecoder(config.t2c, llm.hidden_size)
                echo = UnitDecoder(config.t2c, llm.hidden_size)
                echo.load_state_dict(t2c.state_dict())
            d = config.denoiser
            denoiser = DenoisingAdapter(llm.hidden_size, d.ff_size, d.dropout, d.trainable)
        return cls(config, encoder, frontend, adapter, llm, t2c, echo, denoiser)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None,
                        base_models: dict[str, str] | None = None) -> "EchoX":
        """`device`/`dtype`/`base_models`: see `echox.model.checkpoint.load_checkpoint`
        (default: CPU, the config's dtypes and base models; `dtype` also as bf16 / fp16 / fp32,
        as `load_bundle` takes it). The model comes in eval mode, as transformers' models do
        (dropout off: the same input gives the same answer); training calls `.train()`."""
        dtype = parse_dtype(dtype)
        if device is not None:
            check_device(device)
        return load_checkpoint(cls, checkpoint_folder(folder), device=device, dtype=dtype,
                               base_models=base_models).eval()

    def save_pretrained(self, folder: str | Path, extra_files: dict[str, str] | None = None,
                        extra_writer: Any = None, full_state: dict[str, torch.Tensor] | None = None,
                        omit_parts: tuple[str, ...] = (), dtype: torch.dtype | None = None,
                        replace: bool = False) -> Path:
        """See `echox.model.checkpoint.save_checkpoint` (`omit_parts`/`dtype` slim a shipped copy;
        `replace` replaces a `folder` that is neither a checkpoint nor empty)."""
        return save_checkpoint(self, checkpoint_folder(folder), extra_files=extra_files,
                               extra_writer=extra_writer, full_state=full_state,
                               omit_parts=omit_parts, dtype=dtype, replace=replace)

    @property
    def device(self) -> torch.device:
        return self.adapter.mm_projector1.weight.device

    def use_t2c_config(self, cfg: T2CConfig) -> None:
        """Fresh T2C and echo decoders of another `echox`-layout T2C config (e.g. a Stage II
        checkpoint with a spelling encoder, loaded into a Stage I model that has none)."""
        if cfg.layout != "echox" or self.config.t2c.layout != "echox":
            raise ValueError("use_t2c_config: only the 'echox' layout")
        cfg.validate()
        d, dev = self.llm.hidden_size, self.device
        self.t2c = UnitDecoder(cfg, d).to(dev)
        self.echo = UnitDecoder(cfg, d).to(dev)
        self.echo.load_state_dict(self.t2c.state_dict())
        self.config.t2c = cfg

    def reconfigure_adapter(self, cfg: SpeechAdapterConfig) -> dict[str, list[str]]:
        """Swap in an adapter of another config, keeping every trained weight that still fits.

        For experiments that continue a trained Stage I with a changed adapter (no shrink, a
        linear CTC head instead of the tied one, ...). Weights whose name and shape are unchanged
        are copied; the rest start fresh. A new linear CTC head starts as a copy of the LLM's
        output embeddings (what the tied head computed), with the trained blank logit's weight
        in the blank row when there was one. Returns the names that started fresh ("new") and
        the old weights that were dropped ("dropped").
        """
        cfg.validate()
        old = self.adapter
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            new = _make_adapter(cfg, self.encoder.d_model, self.llm)
        new.to(self.device)
        theirs, ours = old.state_dict(), new.state_dict()
        fits = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
        new.load_state_dict(fits, strict=False)
        fresh = sorted(set(ours) - set(fits))
        if new.audio_feature_head is not None and old.audio_feature_head is None:
            with torch.no_grad():
                w = self.llm.base.get_output_embeddings().weight
                if new.ctc_vocab:  # a restricted head: the rows of its columns
                    w = w.index_select(0, new.ctc_columns.to(w.device))
                new.audio_feature_head.weight.copy_(w.to(new.audio_feature_head.weight.dtype))
                if old.blank_head is not None:  # keep the learned blank logit (its bias is lost)
                    new.audio_feature_head.weight[new.ctc_blank].copy_(old.blank_head.weight[0])
            fresh.remove("audio_feature_head.weight")
        new.requires_grad_(old.trainable)
        new.trainable = old.trainable
        self.adapter = new
        self.config.adapter = cfg
        return {"new": fresh, "dropped": sorted(set(theirs) - set(fits))}

    def restrict_ctc(self, token_ids: list[int]) -> int:
        """Run the CTC softmax over `token_ids` (plus the blank) instead of the whole vocabulary,
        keeping every trained adapter weight (a linear head keeps its rows for those ids).
        Returns the number of CTC columns."""
        ids = sorted(set(int(i) for i in token_ids) | {self.adapter.blank_id})
        if ids[0] < 0 or ids[-1] >= self.llm.vocab_size:
            raise ValueError(f"restrict_ctc: token ids must lie in [0, {self.llm.vocab_size})")
        old_head = self.adapter.audio_feature_head
        old_cols = self.adapter.ctc_columns if self.adapter.ctc_vocab else None
        if old_cols is not None and old_head is not None and not set(ids) <= set(old_cols.tolist()):
            raise ValueError("restrict_ctc: a restricted linear head has no rows for new ids")
        self.reconfigure_adapter(dataclasses.replace(self.config.adapter, ctc_vocab=len(ids)))
        self.adapter.set_ctc_columns(ids)
        if old_head is not None:  # the old head's rows for the kept ids
            rows = torch.tensor(ids, device=old_head.weight.device)
            if old_cols is not None:
                pos = {int(t): j for j, t in enumerate(old_cols.tolist())}
                rows = torch.tensor([pos[i] for i in ids], device=old_head.weight.device)
            with torch.no_grad():
                self.adapter.audio_feature_head.weight.copy_(old_head.weight[rows])
        return len(ids)

    def init_echo_from_t2c(self) -> None:
        """Stage III starts the echo decoder from the trained T2C."""
        self.echo.load_state_dict(self.t2c.state_dict())

    def set_trainable(self, parts: dict[str, bool]) -> None:
        """Stage configs say which parts train: encoder, adapter, llm, t2c, echo, denoiser."""
        for name, flag in parts.items():
            module = getattr(self, name)
            module.trainable = flag
            if name == "llm" and self.config.llm.use_lora:
                for n, p in module.named_parameters():
                    p.requires_grad_(flag and "lora_" in n)
            else:
                module.requires_grad_(flag)

    # ---- speech + prompt -----------------------------------------------------------------
    def featurize(self, audio: list[np.ndarray]) -> SpeechFeatures:
        """Log-mels; on a GPU the batch's STFT runs there in one call."""
        return self.frontend(audio, device=self.device if self.device.type != "cpu" else None)

    def _speech_waves(self, audio: list[np.ndarray],
                      max_seconds: float | None = None) -> list[np.ndarray]:
        """Each clip as a float32 mono waveform, checked: non-empty, mono, and no longer than
        `max_seconds` (None: the config's `encoder.max_seconds`; `AudioTooLongError`, a
        ValueError, names the option to raise it)."""
        limit = self.config.encoder.max_seconds if max_seconds is None else max_seconds
        waves = []
        for i, w in enumerate(audio):
            w = np.ascontiguousarray(w, dtype=np.float32)
            if w.ndim != 1 or w.size == 0:
                raise AudioError(f"utterance {i}: expected a non-empty mono waveform, got {w.shape}")
            check_speech_length(w.size, limit,
                                "question audio" if len(audio) == 1 else f"utterance {i}'s audio")
            waves.append(w)
        return waves

    def _window_counts(self, audio: list[np.ndarray]) -> list[int]:
        """Encoder windows per clip: 1 for a clip that fits one window, else ceil(len / window)."""
        win = self.frontend.max_samples
        return [max(1, -(-np.asarray(w).size // win)) for w in audio]

    def encode_frames(self, audio: list[np.ndarray],
                      max_seconds: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper encoder output [N, T, d_w] and valid frames [N].

        When every clip fits one encoder window (`frontend.max_seconds`) this is the output for
        each clip's padded window (T = T_w = window mel frames / 2), exactly as it always was.
        A longer clip (up to `encoder.max_seconds`) is cut into consecutive whole windows, the
        last one partial and padded with silence like a short clip; the pieces of the whole
        batch go through the encoder as one batch, and a clip's row is its pieces' outputs one
        after the other: the full windows' frames (all valid), then its last window's output,
        padding frames included, as for a one-window clip. Rows are zero-padded to the longest
        (T = most windows x T_w); lengths are the summed valid frames of the pieces. A window
        is `max_source_positions` x 320 samples, so the cuts fall on whole encoder frames (mel
        frame pairs) and a row's valid frames are the whole clip's: ceil(samples / 320).
        `max_seconds`: the longest clip accepted (None: the config's `encoder.max_seconds`).
        """
        waves = self._speech_waves(audio, max_seconds)
        counts = self._window_counts(waves)
        if max(counts, default=1) == 1:  # every clip fits one window: the original path
            feats = self.featurize(waves)
            enc = self.encoder(feats.features.to(self.device))
            return enc, self.encoder.output_lengths(feats.lengths.to(self.device))
        win = self.frontend.max_samples
        assert win % (2 * HOP) == 0, "encoder windows must hold whole encoder frames"
        pieces = [w[s : s + win] for w in waves for s in range(0, w.size, win)]
        feats = self.featurize(pieces)
        enc = self.encoder(feats.features.to(self.device))  # [P, T_w, d_w]
        valid = self.encoder.output_lengths(feats.lengths.to(self.device))  # [P]
        _, t_w, d_w = enc.shape
        out = enc.new_zeros(len(waves), max(counts) * t_w, d_w)  # [N, K_max * T_w, d_w]
        lengths = []
        first = 0
        for i, k in enumerate(counts):
            out[i, : k * t_w] = enc[first : first + k].reshape(k * t_w, d_w)
            lengths.append(valid[first : first + k].sum())
            first += k
        return out, torch.stack(lengths)

    def enable_feature_cache(self, root: str | Path | None) -> None:
        """Read frozen encoder outputs from (and add them to) a disk cache under `root`
        (None turns the cache off). A trainable encoder is never cached."""
        if root is None:
            self.feature_cache = None
            return
        if self.encoder.trainable:
            raise ValueError("the speech encoder trains in this model: its outputs cannot be cached")

        fp = encoder_fingerprint(self.encoder, self.encoder.window_frames,
                                 keep_padding=not self.config.adapter.mask_padding)
        self.feature_cache = EncoderCache(root, fp)

    def _cached_frames(self, audio: list[np.ndarray],
                       max_seconds: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode_frames` through the cache: only the frames the adapter reads are stored
        (each clip's valid frames rounded up to a pair, or all frames of its windows when
        padding is not masked), and a batch is rebuilt from them, zero-padded. Clips longer
        than one window are cached whole, like the others (one entry per clip)."""
        cache = self.feature_cache
        assert cache is not None
        waves = self._speech_waves(audio, max_seconds)  # the same checks as the uncached path
        counts = self._window_counts(waves)
        t_w = self.encoder.window_frames // 2  # encoder frames per window
        keys = [cache.key(w) for w in waves]
        got = [cache.get(k) for k in keys]
        todo = [i for i, g in enumerate(got) if g is None]
        if todo:  # in full precision whatever the step's autocast: entries do not depend on it
            with torch.autocast(self.device.type, enabled=False):
                enc, lengths = self.encode_frames([waves[i] for i in todo], max_seconds)
            for j, i in enumerate(todo):
                valid = int(lengths[j])
                width = counts[i] * t_w  # the frames of this clip's windows in its row
                keep = width if not self.config.adapter.mask_padding else min(
                    width, 2 * ((valid + 1) // 2))
                frames = enc[j, :keep].detach().cpu()
                cache.put(keys[i], frames, valid)
                got[i] = (frames, valid)
        width = max(f.shape[0] for f, _ in got)  # type: ignore[union-attr]
        out = torch.zeros(len(got), width, got[0][0].shape[1], dtype=got[0][0].dtype)  # type: ignore[index]
        for i, (f, _) in enumerate(got):  # type: ignore[misc]
            out[i, : f.shape[0]] = f
        lengths = torch.tensor([v for _, v in got], dtype=torch.long)  # type: ignore[misc]
        return out.to(self.device), lengths.to(self.device)

    def encode_speech(self, audio: list[np.ndarray],
                      max_seconds: float | None = None) -> AdapterOutput:
        """Encoder frames -> adapter. With `adapter.mask_padding` the adapter reads each clip's
        valid frames. Without it (the authors' mode) a batch of one-window clips is read whole
        (every frame of the window, as always); when a clip of the batch spans several windows,
        each clip reads all frames of all its windows (its last window's padding included, as
        a one-window clip reads its whole window) and only the zero rows that pad it to the
        longest clip are masked, so a clip gives the same result in any batch. `max_seconds`:
        the longest clip accepted (None: the config's `encoder.max_seconds`)."""
        if self.feature_cache is not None and not self.encoder.trainable:
            enc, lengths = self._cached_frames(audio, max_seconds)
        else:
            enc, lengths = self.encode_frames(audio, max_seconds)  # [N, T, d_w], [N]
        if self.config.adapter.mask_padding:
            return self.adapter(enc, lengths)
        counts = self._window_counts(audio)
        if max(counts) == 1:
            return self.adapter(enc, None)
        t_w = self.encoder.window_frames // 2
        read = torch.tensor([k * t_w for k in counts], dtype=torch.long, device=enc.device)
        return self.adapter(enc, read)

    def embed_inputs(self, batch: S2TBatch, padding_side: str = "right",
                     max_seconds: float | None = None) -> tuple[MergedInputs, AdapterOutput | None]:
        """Text embeddings with each audio placeholder replaced by its clip's adapter output.
        `max_seconds`: the longest clip accepted (None: the config's `encoder.max_seconds`)."""
        speech = self.encode_speech(batch.audio, max_seconds) if batch.audio else None
        text = self.llm.embed(batch.input_ids.to(self.device))  # [B, L, D]
        merged = merge_speech(
            batch.input_ids.to(self.device), batch.attention_mask.to(self.device),
            batch.labels.to(self.device), text,
            speech.embeds if speech else None, speech.lengths if speech else None,
            self.llm.audio_token_id, padding_side=padding_side,
        )
        return merged, speech

    def collate(self, dialogues: list[list[Turn]], add_generation_prompt: bool = False,
                units: list[list[list[int]]] | None = None) -> S2TBatch:
        enc = [self.prompt.encode(d, add_generation_prompt) for d in dialogues]
        return collate_s2t(
            enc, self.tokenizer.pad_token_id,
            lambda t: self.tokenizer(t, add_special_tokens=False)["input_ids"], units=units,
        )

    # ---- Stage I: S2T --------------------------------------------------------------------
    def forward_s2t(self, batch: S2TBatch, share_prompt: bool = True) -> S2TOutput:
        """Stage I's loss. `share_prompt`: the leading tokens every row has (system prompt,
        chat template) run once for the batch (the same loss and gradients, less work)."""
        merged, speech = self.embed_inputs(batch)
        targets = merged.labels[:, 1:]  # position p predicts the label at p + 1
        keep = torch.nonzero((targets != IGNORE).any(0)).flatten()
        p = self._shared_prompt(batch, merged, keep) if share_prompt else 0
        if p:
            out = self._llm_shared_prefix(merged, p, keep)
        else:
            out = self.llm(merged.inputs_embeds, merged.attention_mask, merged.position_ids,
                           logits_to_keep=keep if keep.numel() else 1)
        if keep.numel():
            ce = losses.aligned_ce_loss(out.logits, targets[:, keep])
        else:
            ce = out.logits.sum() * 0.0
        if speech is not None and self.config.loss.ctc_weight > 0:
            ctc = self._ctc(speech, batch)
        else:
            ctc = ce.new_zeros(())
        loss = self.config.loss.s2t_weight * ce + self.config.loss.ctc_weight * ctc
        return S2TOutput(out.logits, out.hidden, merged, speech, loss, ce, ctc)

    def _shared_prompt(self, batch: S2TBatch, merged: MergedInputs, keep: torch.Tensor) -> int:
        """How many leading positions (system prompt, chat template) every row of a training
        batch shares and no loss reads: they run once for the batch (`_llm_shared_prefix`).
        0 when there is nothing to share (one row, or a label inside the shared tokens)."""
        b = batch.input_ids.shape[0]
        if b < 2 or not keep.numel():
            return 0
        p = shared_prefix_length(batch.input_ids, batch.attention_mask, self.llm.audio_token_id)
        # the shared tokens come before any speech block, so they sit at the same merged
        # positions; position p - 1 would predict the label at p, so no kept logit may be there
        return min(p, int(keep[0]))

    def _llm_shared_prefix(self, merged: MergedInputs, p: int, keep: torch.Tensor) -> LLMOutput:
        """The LLM over a right-padded batch whose first `p` inputs are the same in every row:
        those run once (one row, their KV cache repeated for all rows, gradients summed back
        through the repeat) and the rest of each row attends to them. The same logits and
        hidden states as one pass over the whole batch, for about (L - p) / L of its cost."""
        b = merged.inputs_embeds.shape[0]
        mask = merged.attention_mask
        head = self.llm(merged.inputs_embeds[:1, :p], mask[:1, :p], merged.position_ids[:1, :p],
                        use_cache=True, logits_to_keep=1)
        cache = head.past_key_values
        if not hasattr(cache, "batch_repeat_interleave"):  # a cache that cannot repeat rows
            return self.llm(merged.inputs_embeds, mask, merged.position_ids, logits_to_keep=keep)
        cache.batch_repeat_interleave(b)
        tail = self.llm(merged.inputs_embeds[:, p:], mask, merged.position_ids[:, p:],
                        past_key_values=cache, logits_to_keep=keep - p)
        hidden = torch.cat([head.hidden.expand(b, -1, -1), tail.hidden], dim=1)
        return LLMOutput(tail.logits, hidden, None)

    def ctc_only_loss(self, batch: S2TBatch) -> torch.Tensor:
        """Stage I with `train.ctc_only`: the adapter alone learns to hear (CTC on the
        transcripts) and the LLM is never run, a cheap pre-training of the adapter on ASR audio."""
        return self._ctc(self.encode_speech(batch.audio), batch)

    def _ctc(self, speech: AdapterOutput, batch: S2TBatch) -> torch.Tensor:
        targets = self.adapter.ctc_target_index(batch.ctc_targets.to(self.device), IGNORE)
        return losses.ctc_loss(speech.ctc_logits, speech.frame_lengths, targets, self.adapter.ctc_blank)

    # ---- Stage II: T2C -------------------------------------------------------------------
    def text_condition(self, text_ids: list[list[int]]) -> list[torch.Tensor]:
        """The T2C's input per text: the frozen LLM token embeddings, plus what each token
        spells when the T2C has a spelling encoder (`t2c.spelling_dim`; it trains with the T2C)."""
        ids = [torch.tensor(t, dtype=torch.long, device=self.device) for t in text_ids]
        with torch.no_grad():
            emb = [self.llm.embed(i).detach() for i in ids]
        spell = self._reads_text(getattr(self.t2c, "spelling", None))
        if spell is None:
            return emb
        return [e + spell(i).to(e.dtype) for e, i in zip(emb, ids)]

    def _reader(self, decoder: nn.Module, cond: list[torch.Tensor], ids: list[list[int]] | None) -> list[torch.Tensor]:
        """What a unit decoder (T2C or echo) reads: its token-level conditions, byte by byte
        when it has a `t2c.char_condition`."""
        if self._reads_text(getattr(decoder, "char_condition", None)) is None:
            return cond
        return decoder.expand(cond, ids)

    def _reads_text(self, module: Any) -> Any:
        """`module` (a decoder's spelling encoder or byte reader, or None), given the text of
        a token id from this model's tokenizer."""
        if module is not None and module.token_text is None:
            module.token_text = lambda i: self.tokenizer.decode([i])
        return module

    def t2c_row_length(self, text_ids: list[int], n_units: int) -> int:
        """Positions the T2C's teacher-forced row of this text and `n_units` units takes
        (Stage II leaves out pairs longer than `t2c.max_positions`)."""
        self._reads_text(getattr(self.t2c, "char_condition", None))
        return self.t2c.row_length(text_ids, n_units)

    def forward_t2c(self, batch: T2CBatch) -> tuple[torch.Tensor, UnitOutput]:
        cond = self._reader(self.t2c, self.text_condition(batch.text_ids), batch.text_ids)
        out = self.t2c(cond, batch.units)
        return self._unit_loss(out), out

    def _unit_loss(self, out: UnitOutput) -> torch.Tensor:
        """CE on the units, plus `t2c.align_weight` × the guided-attention cost if any."""
        loss = losses.aligned_ce_loss(out.logits, out.labels)
        if out.align is not None:
            loss = loss + self.config.t2c.align_weight * out.align
        return loss

    # ---- Stage III: echo -----------------------------------------------------------------
    def response_states(self, s2t: S2TOutput, batch: S2TBatch) -> list[tuple[torch.Tensor, list[int]]]:
        """Per response: hidden states H (the state that predicted each token) and its ids X′."""
        out = []
        for b, spans in enumerate(batch.response_spans):
            for start, end in spans:
                idx = s2t.merged.new_index[b, start:end]  # merged positions of X′
                out.append((s2t.hidden[b, idx - 1], batch.input_ids[b, start:end].tolist()))
        return out

    def cached_response_states(self, batch: S2TBatch) -> list[tuple[torch.Tensor, list[int]]]:
        """`response_states` from the batch's precomputed states (a frozen S2T model)."""
        ids = [batch.input_ids[b, s:e].tolist() for b, spans in enumerate(batch.response_spans) for s, e in spans]
        states = batch.states or []
        if len(states) != len(ids) or any(h.shape[0] != len(x) for h, x in zip(states, ids)):
            raise ValueError("the batch's cached response states do not fit its responses "
                             "(a stale states cache? delete it to recompute)")
        return [(h.to(self.device, torch.float32), x) for h, x in zip(states, ids)]

    def trigger_segments(self, hidden: torch.Tensor) -> list[tuple[int, int]]:
        """Where the streaming trigger would cut a response with these hidden states."""
        scores = trigger_scores(hidden.detach(), self.trigger_row())
        return segment_boundaries(scores, self.config.trigger)

    def trigger_row(self) -> torch.Tensor:
        ids = self.tokenizer(self.config.trigger.token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(f"trigger.token {self.config.trigger.token!r} is {len(ids)} tokens "
                              "of the LLM's tokenizer; the trigger needs one token")
        return self.llm.base.get_output_embeddings().weight[ids[0]]

    def segment_states(
        self, responses: list[tuple[torch.Tensor, list[int]]],
        segments: list[list[tuple[int, int]]] | None, cut: bool,
    ) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Split responses into echo segments: given ones, trigger cuts (`cut`), or whole."""
        hs, xs = [], []
        for r, (h, x) in enumerate(responses):
            if segments is not None:
                segs = segments[r]
            elif cut:
                segs = self.trigger_segments(h)
            else:
                segs = [(0, len(x))]
            for s0, s1 in segs:
                if s1 > s0:
                    hs.append(h[s0:s1])
                    xs.append(x[s0:s1])
        return hs, xs

    def forward_echo(self, batch: S2TBatch, units: list[list[int]] | None = None,
                     cut: bool = False, share_prompt: bool = True) -> EchoOutput:
        """L = L_echo + λ·L_den + L_S2T. `units`: gold or precomputed pseudo-labels per segment;
        None decodes pseudo-labels online with the frozen T2C. `cut` splits responses where
        the streaming trigger would (unless the batch carries its segments)."""
        if batch.states is not None:  # a frozen S2T model: its states were computed once
            responses = self.cached_response_states(batch)
            l_s2t = responses[0][0].new_zeros((), dtype=torch.float32)
        else:
            s2t = self.forward_s2t(batch, share_prompt)
            responses, l_s2t = self.response_states(s2t, batch), s2t.loss
        hs, xs = self.segment_states(responses, batch.segments, cut)
        if not hs:
            raise ValueError("the batch has no response tokens to echo")
        targets = units if units is not None else batch.units
        if targets is None:
            targets = self.pseudo_labels(xs)
        if len(targets) != len(hs):
            raise ValueError(f"{len(hs)} response segments but {len(targets)} unit sequences")
        cond = [self.denoiser(h) for h in hs]  # Adapter(H) per segment
        uo = self.echo(self._reader(self.echo, cond, xs), targets)
        l_echo = self._unit_loss(uo)
        emb = torch.cat(self.text_condition(xs))
        l_den = losses.denoise_loss(torch.cat(cond), emb,
                                    len(cond) if self.config.loss.den_reduction == "sum" else None)
        tot = losses.stage3_total(l_echo, l_den, l_s2t, self.config.loss.den_lambda,
                                  self.config.loss.den_cap)
        return EchoOutput(tot.total, l_echo, l_den, l_s2t, tot.lam, uo, targets)

    def forward(self, batch: S2TBatch | T2CBatch, task: str, **kw: Any) -> StepOutput:
        """One entry point for training (DDP wraps `__call__`): task = s2t | t2c | echo."""
        if task == "s2t":
            if kw.get("ctc_only"):
                ctc = self.ctc_only_loss(batch)  # type: ignore[arg-type]
                return StepOutput(ctc, {"ctc": ctc.item()})
            o = self.forward_s2t(batch, kw.get("share_prompt", True))  # type: ignore[arg-type]
            return StepOutput(o.loss, {"ce": o.ce.item(), "ctc": o.ctc.item()})
        if task == "t2c":
            loss, uo = self.forward_t2c(batch)  # type: ignore[arg-type]
            return StepOutput(loss, {} if uo.align is None else {"align": uo.align.item()})
        if task == "echo":
            e = self.forward_echo(batch, **kw)  # type: ignore[arg-type]
            return StepOutput(e.loss, {"echo": e.echo.item(), "den": e.den.item(),
                                       "s2t": e.s2t.item(), "lambda": e.lam})
        raise ValueError(f"unknown task {task!r}; expected s2t, t2c or echo")

    @torch.no_grad()
    def pseudo_labels(self, text_ids: list[list[int]], sampling: SamplingConfig | None = None) -> list[list[int]]:
        """Y′ = units the frozen T2C decodes from Emb(X′)."""
        if "t2c" in self.omitted_parts and self.t2c is not self.echo:  # untrained: noise
            raise UnitError("this model was loaded from a checkpoint saved without its T2C (a "
                            "slim bundle): units from text need the T2C of a Stage II run "
                            "(`echox train t2c`); units_from_hidden voices an answer")
        was = self.t2c.training
        self.t2c.eval()
        try:
            return self.t2c.generate(self._reader(self.t2c, self.text_condition(text_ids), text_ids), sampling)
        finally:
            self.t2c.train(was)

    # ---- generation ----------------------------------------------------------------------
    def _llm_step(self, embeds, mask, pos, cache):  # type: ignore[no-untyped-def]
        # decoding reads the last position only: no vocabulary projection of the rest
        out = self.llm(embeds, mask, pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits, out.hidden, out.past_key_values

    @property
    def llm_positions(self) -> int | None:
        """The LLM's positions (prompt and answer together), where its config says."""
        limit = getattr(getattr(self.llm.model, "config", None), "max_position_embeddings", None)
        return limit if isinstance(limit, int) and not isinstance(limit, bool) else None

    @torch.no_grad()
    def generate_text(
        self, dialogues: list[list[Turn]], sampling: SamplingConfig | None = None, use_cache: bool = True
    ) -> TextGeneration:
        """Speech and/or text history -> the next assistant turn, with per-token hidden states.
        The answer ends where the LLM's positions do (`max_new_tokens` is cut to the room the
        prompt leaves); a prompt that fills them is a `PromptError`."""
        sampling = _sampling_or_default(sampling)
        if not isinstance(dialogues, (list, tuple)) or not dialogues:
            raise PromptError("generate_text needs a non-empty list of dialogues "
                              "(each a list of Turns ending with a user turn)")
        for i, d in enumerate(dialogues):
            if not isinstance(d, (list, tuple)) or not all(isinstance(t, Turn) for t in d):
                raise PromptError(f"dialogue {i} must be a list of Turns "
                                  f"(echox.model.prompt.Turn), got {type(d).__name__}")
            if not d or d[-1].role != "user":
                raise PromptError(f"dialogue {i} must end with a user turn to answer, "
                                  f"{'but it is empty' if not d else 'not an assistant turn'}")
        batch = self.collate(dialogues, add_generation_prompt=True)
        # The tokens every dialogue starts with (system prompt, chat template) run once for the
        # batch; each row's own inputs follow them after its left padding.
        p = shared_prefix_length(batch.input_ids, batch.attention_mask, self.llm.audio_token_id)
        shared = None
        if p:
            shared = self.llm.embed(batch.input_ids[:1, :p].to(self.device))
            batch = dataclasses.replace(batch, input_ids=batch.input_ids[:, p:],
                                        attention_mask=batch.attention_mask[:, p:], labels=batch.labels[:, p:])
        merged, _ = self.embed_inputs(batch, padding_side="left")
        n = p + int(merged.inputs_embeds.shape[1])  # the longest prompt, padded rows alike
        limit = self.llm_positions
        if limit is not None:  # it ran past them (max_new_tokens=10**6: 17 GB and no end)
            if n >= limit:
                raise PromptError(f"the prompt is {n} positions, over the LLM's {limit}: "
                                  "shorten the text, the speech or the history")
            if n + sampling.max_new_tokens > limit:
                sampling = dataclasses.replace(sampling, max_new_tokens=limit - n)
        res: DecodeResult = decode(
            self._llm_step, lambda ids: self.llm.embed(ids), merged.inputs_embeds,
            merged.attention_mask, self.llm.stop_ids, sampling, use_cache=use_cache,
            suppress_ids=self.llm.added_token_ids, shared=shared,
        )
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in res.tokens]
        return TextGeneration(res.tokens, texts, res.hidden, res.stopped)

    @torch.no_grad()
    def units_from_text(self, texts: list[str], sampling: SamplingConfig | None = None) -> list[list[int]]:
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts \
                or not all(isinstance(t, str) and t for t in texts):
            raise PromptError("units_from_text needs a non-empty list of non-empty strings")
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return self.pseudo_labels(ids, _sampling_or_none(sampling))

    @torch.no_grad()
    def units_from_hidden(self, hidden: list[torch.Tensor], sampling: SamplingConfig | None = None,
                          ids: list[list[int]] | None = None) -> list[list[int]]:
        """Echo path: Adapter(H) -> echo decoder -> units. `ids`: each segment's token ids
        (needed by an echo decoder that reads its condition by bytes)."""
        if not isinstance(hidden, (list, tuple)) or not hidden:
            raise UnitError("units_from_hidden needs a non-empty list of hidden states [n, D]")
        for i, h in enumerate(hidden):
            self._check_hidden(h, f"hidden[{i}]")
        cond = [self.denoiser(h.to(self.device)) for h in hidden]
        return self.echo.generate(self._reader(self.echo, cond, ids), _sampling_or_none(sampling))

    def _check_hidden(self, h: Any, what: str) -> None:
        """Hidden states the echo path can read: a float tensor [n >= 1, hidden_size], finite."""
        d = self.llm.hidden_size
        if not isinstance(h, torch.Tensor) or not h.is_floating_point() or h.dim() != 2 \
                or h.shape[0] == 0 or h.shape[1] != d:
            got = f"{h.dtype} {tuple(h.shape)}" if isinstance(h, torch.Tensor) else type(h).__name__
            raise UnitError(f"{what}: expected a float tensor [n >= 1, {d}] of LLM hidden states, "
                            f"got {got}")
        if not bool(torch.isfinite(h).all()):
            raise UnitError(f"{what}: the hidden states contain NaN or inf")

    @torch.no_grad()
    def iter_units_from_hidden(
        self, hidden: torch.Tensor, sampling: SamplingConfig | None = None, ids: list[int] | None = None
    ) -> Iterator[int]:
        """`units_from_hidden` for one segment [n, D], yielding units as the echo decoder
        samples them (the streaming engine voices the first ones before the last exist)."""
        self._check_hidden(hidden, "hidden")
        (cond,) = self._reader(self.echo, [self.denoiser(hidden.to(self.device))], None if ids is None else [ids])
        yield from self.echo.iter_generate(cond, _sampling_or_none(sampling))


def _sampling_or_none(sampling: Any) -> SamplingConfig | None:
    """`sampling` checked: a `SamplingConfig` or None (the caller's default)."""
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise ConfigError(f"sampling must be an echox.model.generation.SamplingConfig or None, "
                          f"got {type(sampling).__name__}")
    return sampling


def _sampling_or_default(sampling: Any) -> SamplingConfig:
    return _sampling_or_none(sampling) or SamplingConfig()


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, audio_token_id: int) -> int:
    """How many leading tokens all rows of a right-padded batch [B, L] share, stopping before
    the first audio placeholder and leaving every row at least one token of its own."""
    valid = attention_mask.bool()
    n = int(valid.sum(1).min()) - 1
    if n <= 0:
        return 0
    head = input_ids[:, :n]
    same = (head == head[:1]).all(0) & valid[:, :n].all(0) & (head[0] != audio_token_id)
    bad = (~same).nonzero()
    return int(bad[0, 0]) if bad.numel() else n


def _make_adapter(a: SpeechAdapterConfig, d_whisper: int, llm: LLM) -> SpeechAdapter:
    return SpeechAdapter(
        d_whisper, llm.hidden_size, llm.vocab_size, blank_id=llm.audio_token_id,
        num_heads=a.num_heads, ffn_mult=a.ffn_mult, dropout=a.dropout,
        lookback_dropout=a.lookback_dropout, drop_blank=a.drop_blank, trainable=a.trainable,
        tied_head=llm.base.get_output_embeddings() if a.ctc_head == "tied" else None,
        blank_head=a.blank_head, lookback_keys=a.lookback_keys,
        encoder_attention=a.encoder_attention, shrink=a.shrink, ctc_vocab=a.ctc_vocab,
        extra_layers=a.extra_layers, shrink_blank_penalty=a.shrink_blank_penalty,
    )
