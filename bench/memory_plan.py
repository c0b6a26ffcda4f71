"""Memory and compute plan of the 3B / 8B recipes on one node of 8 GPUs, counted on the meta
device (docs/scale.md quotes its output).

    python bench/memory_plan.py --preset 3b          # or 8b; --json FILE keeps the numbers

No weights are downloaded and no GPU is needed: the Llama and Whisper architectures are built
from their published config values (below, with their source) with `transformers`' config
classes on torch's meta device, and EchoX's own parts (speech adapter, LoRA through peft, T2C,
echo decoder, denoiser) are the project's classes with the recipe's model config
(`recipes/<preset>/model.yaml`). A meta tensor has a shape and a dtype but no storage, so
building an 8B model and running a step takes seconds and no memory.

Counted per stage (which parts train: `echox.train.stages.STAGE_PARTS`):

- weights, gradients and AdamW states of the tensors as the trainer creates them (frozen LLM
  in bfloat16, Whisper encoder and every trained part in float32, LoRA in float32 as peft
  makes it), placed as DDP, DeepSpeed ZeRO-2, ZeRO-3 or FSDP (full shard) place them on each of
  8 GPUs (`STRATEGIES` says how each is modelled);
- activations: the tensors autograd saves for the backward pass of one micro-batch at the
  recipe's `batch_size` and the planning lengths (`Workload`), counted with
  `torch.autograd.graph.saved_tensors_hooks` on a meta forward pass under bf16 compute (what
  autocast does on a GPU), attention as flash attention (saves q, k, v, out and the
  log-sum-exp, not the score matrix); the trainer has no activation checkpointing;
- FLOPs of a training step, counted by `torch.utils.flop_counter.FlopCounterMode` on the same
  meta passes (forward and backward; the frozen Whisper encoder forward only), per average
  example of each data source; with the recipe's steps, batch and the dataset sizes they give
  tokens per epoch and GPU-hours at a stated MFU.

What is not counted: the CUDA context and the allocator's slack (budget 3-5 GB a GPU),
NCCL buffers, the CTC loss' own alpha/beta tables (B x T x (2S+1) floats, small beside the
logits) and the short-lived tensors of the backward pass beyond one copy of the largest saved
tensor (added as `transient`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from echox.config import EchoXConfig, load_config  # noqa: E402
from echox.train.stages import STAGE_PARTS  # noqa: E402

GB = 1e9
N_GPUS = 8
H100_BF16_PEAK = 989.4e12  # FLOP/s, H100 SXM dense bf16 (NVIDIA's datasheet: 1,979 with sparsity)

# ---- published configs ------------------------------------------------------------------
# Written from the config.json files of the hub repos named in the comment (not downloaded
# here). The meta builds reproduce the published parameter counts: 3.21B (Llama-3.2-3B, tied
# embeddings), 8.03B (Llama-3.1-8B), 0.64B for Whisper-large-v3's encoder (1.55B with its
# decoder).
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
LLMS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.2-3B-Instruct/config.json
    "meta-llama/Llama-3.2-3B-Instruct": dict(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    # meta-llama/Llama-3.1-8B-Instruct/config.json
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}),
}
ENCODERS: dict[str, dict[str, Any]] = {
    # openai/whisper-large-v3/config.json (the encoder half is what EchoX loads)
    "openai/whisper-large-v3": dict(
        d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
        decoder_layers=32, decoder_attention_heads=20, decoder_ffn_dim=5120, num_mel_bins=128,
        max_source_positions=1500, max_target_positions=448, vocab_size=51866),
}
ADDED_TOKENS = 1  # <audio_patch>, added to the tokenizer (echox.model.llm._fit_vocab)


# ---- planning workload (assumptions; docs/scale.md) ---------------------------------------
@dataclass
class Source:
    """One data source as average examples: `count` examples of `audio_s` seconds of question
    speech, `response` LLM tokens of answer, (T2C / echo) `units` unit-language tokens."""

    name: str
    count: int
    hours: float
    audio_s: float
    response: int
    instruction: int = 0  # a text instruction beside the audio (ASR turns)
    units: int = 0
    text: int = 0  # T2C: text tokens of the condition


@dataclass
class Workload:
    """Planning lengths; every number here is an assumption stated in docs/scale.md."""

    prompt: int = 80  # system prompt + Llama-3 chat template (with its date lines)
    tokens_per_s: float = 3.3  # LLM tokens per second of English speech (~2.5 words/s)
    kept_per_token: float = 2.0  # shrink keeps ~1 frame per token run + 1 per blank run
    adapter_hz: float = 25.0  # Whisper 50 Hz frames, concatenated in pairs
    units_per_s: float = 12.5  # mHuBERT 50 Hz, ~50 % kept after dedup, unit language ~2x
    segment_tokens: int = 50  # echo: responses cut by the trigger (at most max_len = 50)
    # memory: the longest micro-batch (padding to it), not the average
    peak_audio_s: float = 30.0  # one full Whisper window
    peak_llm: int = 512
    peak_response: int = 320
    peak_text: int = 256
    peak_units: int = 1024
    peak_segments: int = 4  # echo segments per dialogue
    peak_segment_units: int = 320

    def sources(self, stage: str) -> list[Source]:
        qa = Source("EchoX-Dialogues spoken QA", 720_000, 2000.0, 10.0, 150)
        if stage == "s2t":
            return [Source("LibriSpeech 960 h (ASR)", 281_241, 960.0, 12.3, 41, instruction=6),
                    Source("MLS English, 30 of 1,416 shards (ASR)", 229_000, 946.0, 14.9, 49,
                           instruction=6),
                    qa]
        if stage == "t2c":
            return [Source("TTS of responses (mHuBERT units)", 160_000, 2000.0, 45.0, 0,
                           units=563, text=150)]
        return [qa]  # echo, echo_gold


# ---- building on the meta device ----------------------------------------------------------
def build_parts(cfg: EchoXConfig, dtype_all: torch.dtype | None = None) -> dict[str, nn.Module]:
    """EchoX's parts as `EchoX.build` makes them, on the meta device. `dtype_all` casts every
    part (activation counts under bf16 compute)."""
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from echox.model.denoiser import DenoisingAdapter
    from echox.model.llm import _DTYPES, _fit_vocab, with_lora
    from echox.model.speech_adapter import SpeechAdapter
    from echox.model.unit_decoder import UnitDecoder

    if cfg.llm.name_or_path not in LLMS or cfg.encoder.name_or_path not in ENCODERS:
        raise SystemExit(f"no published config here for {cfg.llm.name_or_path} / "
                         f"{cfg.encoder.name_or_path}; known: {sorted(LLMS)}, {sorted(ENCODERS)}")
    lc = LLMS[cfg.llm.name_or_path]
    with torch.device("meta"):
        enc = WhisperEncoder(WhisperConfig(**ENCODERS[cfg.encoder.name_or_path]))  # float32
        enc.requires_grad_(cfg.encoder.trainable)
        llm = LlamaForCausalLM(LlamaConfig(**lc)).to(_DTYPES[cfg.llm.dtype])
        _fit_vocab(llm, lc["vocab_size"] + ADDED_TOKENS)
        llm.requires_grad_(False)
        llm = with_lora(llm, cfg.llm.lora)
        d, v = lc["hidden_size"], lc["vocab_size"] + ADDED_TOKENS
        a = cfg.adapter
        tied = llm.get_base_model().get_output_embeddings() if a.ctc_head == "tied" else None
        adapter = SpeechAdapter(enc.config.d_model, d, v, blank_id=v - 1, num_heads=a.num_heads,
                                ffn_mult=a.ffn_mult, dropout=a.dropout, lookback_dropout=0.0,
                                tied_head=tied, blank_head=a.blank_head, lookback_keys=a.lookback_keys)
        t2c, echo = UnitDecoder(cfg.t2c, d), UnitDecoder(cfg.t2c, d)
        den = DenoisingAdapter(d, cfg.denoiser.ff_size, 0.0)
    parts = {"encoder": enc, "adapter": adapter, "llm": llm, "t2c": t2c, "echo": echo, "denoiser": den}
    if dtype_all is not None:
        for m in parts.values():
            m.to(dtype_all)
    return parts


def set_stage(parts: dict[str, nn.Module], stage: str) -> None:
    """`echox.train.stages.apply_stage` on the parts (LoRA only, for the LLM)."""
    for name, m in parts.items():
        on = name in STAGE_PARTS[stage]
        if name == "llm":
            for n, p in m.named_parameters():
                p.requires_grad_(on and "lora_" in n)
        else:
            m.requires_grad_(on)


def _params(parts: dict[str, nn.Module]) -> Iterator[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    for name, m in parts.items():
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p


# ---- attention as flash attention on meta ---------------------------------------------------
def _meta_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):  # type: ignore[no-untyped-def]
    """F.scaled_dot_product_attention as a GPU runs it (flash / memory-efficient kernels: no
    score matrix saved). On meta the dispatcher would pick the math kernel."""
    if key.shape[-3] != query.shape[-3]:  # grouped-query attention
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    if attn_mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask.expand(query.shape[0], query.shape[1], -1, -1), True,
        dropout_p, is_causal, scale=scale)[0]


@dataclass
class Pass:
    saved_bytes: int = 0
    largest: int = 0
    flops: int = 0


@contextlib.contextmanager
def measure(params: set[int]) -> Iterator[Pass]:
    """Saved-for-backward bytes (parameters and their views excluded, each storage once) and
    FLOPs of what runs inside."""
    from torch.utils.flop_counter import FlopCounterMode

    res, saved = Pass(), {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params and id(t) not in params:
            saved[id(base)] = base
        return t

    import transformers.masking_utils as mu

    fc = FlopCounterMode(display=False)
    orig, orig_packed = F.scaled_dot_product_attention, mu.find_packed_sequence_indices
    F.scaled_dot_product_attention = _meta_sdpa  # type: ignore[assignment]
    # one sequence per row (no packing); the check would read a meta tensor's value
    mu.find_packed_sequence_indices = lambda position_ids: None  # type: ignore[assignment]
    try:
        with fc, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield res
    finally:
        F.scaled_dot_product_attention = orig  # type: ignore[assignment]
        mu.find_packed_sequence_indices = orig_packed  # type: ignore[assignment]
    sizes = [t.numel() * t.element_size() for t in saved.values()]
    res.saved_bytes, res.largest, res.flops = sum(sizes), max(sizes, default=0), fc.get_total_flops()


# ---- one training step of each stage, on meta --------------------------------------------
META = torch.device("meta")


def _s2t(parts: dict[str, nn.Module], b: int, audio_s: float, kept: int, llm_len: int,
         labelled: int, adapter_hz: float, run_encoder: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder (no grad) -> adapter (CTC head, look-back) -> LLM (LoRA) -> CE + 0.3 CTC.
    Returns (loss, last hidden states [b, llm_len, D])."""
    enc, adapter, llm = parts["encoder"], parts["adapter"], parts["llm"]
    dt = next(adapter.parameters()).dtype
    d_w = enc.config.d_model
    if run_encoder:
        with torch.no_grad():
            feats = enc(torch.empty(b, enc.config.num_mel_bins, 2 * enc.config.max_source_positions,
                                    device=META, dtype=next(enc.parameters()).dtype)).last_hidden_state
    else:
        feats = torch.empty(b, enc.config.max_source_positions, d_w, device=META, dtype=dt)
    t = max(1, int(round(audio_s * adapter_hz)))
    x = feats[:, : 2 * t].reshape(b, t, 2 * d_w).to(dt)
    x = adapter.out_norm(adapter.asr_transformer_encoder(adapter.mm_projector1(x)))  # F
    ctc_logits = adapter.ctc_head(x)  # [b, t, V]
    ctc = ctc_logits.float().log_softmax(-1).mean()  # stands in for F.ctc_loss (no meta kernel)
    q = x[:, :kept]
    attn, _ = adapter.lbm(q, x, x, need_weights=False)
    speech = adapter.atten_layer_norm(q + attn)  # [b, kept, D]
    base = llm.get_base_model()
    text = base.get_input_embeddings()(torch.zeros(b, llm_len - kept, dtype=torch.long, device=META))
    embeds = torch.cat([speech.to(text.dtype), text], 1)
    keep = torch.arange(llm_len - labelled - 1, llm_len - 1, device=META)
    out = llm(inputs_embeds=embeds, attention_mask=None, logits_to_keep=keep,
              output_hidden_states=True, return_dict=True, use_cache=False)
    ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(),
                         torch.zeros(b * labelled, dtype=torch.long, device=META))
    return ce + 0.3 * ctc, out.hidden_states[-1]


def _unit_decoder(dec: nn.Module, cond: torch.Tensor, units: int) -> torch.Tensor:
    """T2C / echo decoder teacher-forced on `units` after the condition [b, n, D]; CE loss."""
    b = cond.shape[0]
    proj = dec.adapter(cond.to(dec.adapter.weight.dtype))
    emb = dec.model.embed_tokens(torch.zeros(b, units + 2, dtype=torch.long, device=META))
    h = dec.model(inputs_embeds=torch.cat([proj, emb], 1), use_cache=False).last_hidden_state
    logits = dec.lm_head(h[:, -(units + 1):])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                           torch.zeros(b * (units + 1), dtype=torch.long, device=META))


def step(parts: dict[str, nn.Module], stage: str, b: int, shape: dict[str, Any],
         w: Workload) -> Pass:
    params = {id(p) for _, p in _params(parts)}
    with measure(params) as res:
        if stage == "t2c":
            with torch.no_grad():  # the frozen LLM's token embeddings of the text
                cond = parts["llm"].get_base_model().get_input_embeddings()(
                    torch.zeros(b, shape["text"], dtype=torch.long, device=META))
            loss = _unit_decoder(parts["t2c"], cond, shape["units"])
        else:
            loss, hidden = _s2t(parts, b, shape["audio_s"], shape["kept"], shape["llm"],
                                shape["labelled"], w.adapter_hz)
            if stage in ("echo", "echo_gold"):
                segs, n = shape["segments"], shape["segment_tokens"]
                h = hidden[:, -segs * n - 1:-1].reshape(b * segs, n, -1)  # response states
                cond = parts["denoiser"](h)
                l_echo = _unit_decoder(parts["echo"], cond, shape["segment_units"])
                emb = parts["llm"].get_base_model().get_input_embeddings()(
                    torch.zeros(b * segs, n, dtype=torch.long, device=META))
                l_den = (1 - F.cosine_similarity(cond.float(), emb.float(), dim=-1)).mean()
                loss = loss + l_echo + l_den
        loss.backward()
    return res


def shapes(stage: str, src: Source, w: Workload, peak: bool) -> dict[str, Any]:
    """Lengths of one example (`peak`: of the longest micro-batch). echo_gold: one segment per
    response (gold units cover the whole response; no trigger cuts)."""
    gold = stage == "echo_gold"
    if peak:
        s = {"audio_s": w.peak_audio_s, "llm": w.peak_llm, "labelled": w.peak_response,
             "text": w.peak_text, "units": w.peak_units,
             "segments": 1 if gold else w.peak_segments,
             "segment_tokens": w.peak_response - 1 if gold else w.segment_tokens,
             "segment_units": w.peak_units if gold else w.peak_segment_units}
        s["kept"] = min(int(w.peak_audio_s * w.adapter_hz),
                        int(w.kept_per_token * w.tokens_per_s * w.peak_audio_s))
        return s
    spoken = w.tokens_per_s * src.audio_s
    kept = max(1, int(round(w.kept_per_token * spoken)))
    segs = 1 if gold else max(1, math.ceil(src.response / w.segment_tokens))
    return {"audio_s": src.audio_s, "kept": kept, "labelled": src.response + 1,
            "llm": w.prompt + src.instruction + kept + src.response + 1, "text": src.text,
            "units": src.units, "segments": segs, "segment_tokens": src.response // segs,
            "segment_units": int(round(src.response / segs / w.tokens_per_s * w.units_per_s))}


# ---- placing the state on 8 GPUs -------------------------------------------------------------
STRATEGIES = {
    "DDP": "every GPU holds all weights as loaded, fp32 grads, DDP's fp32 gradient buckets "
           "(a second copy of the grads) and AdamW's two fp32 moments",
    "ZeRO-2": "DeepSpeed casts the whole module to bf16 (weights 2 B/param everywhere); fp32 "
              "master weights, AdamW moments and bf16 grads of the trained tensors sharded /8; "
              "reduce + all-gather buckets of min(5e8, trained) bf16 elements each (DeepSpeed's "
              "defaults)",
    "ZeRO-3": "as ZeRO-2, and the bf16 weights sharded /8 too; plus the gathered working set "
              "(stage3_max_live_parameters = 1e9 bf16 elements, DeepSpeed's default) and one "
              "reduce bucket",
    "FSDP": "recipes/accelerate/fsdp.yaml: full shard, fp32 weights (FSDP1 flattens only "
            "tensors of one dtype, so the LLM must load in float32: --set model.llm.dtype=float32) "
            "sharded /8, bf16 compute copies of the root unit (all but the LlamaDecoderLayers) "
            "and of 2 decoder layers gathered at a time, fp32 grads and AdamW moments sharded /8",
}


def state_bytes(parts: dict[str, nn.Module], stage: str) -> dict[str, Any]:
    set_stage(parts, stage)
    trainable = frozen = frozen_bytes = trained_bytes = total = 0
    by_part: dict[str, list[int]] = {}
    for name, p in _params(parts):
        n = p.numel()
        total += n
        row = by_part.setdefault(name, [0, 0])  # [trainable, frozen]
        if p.requires_grad:
            trainable += n
            trained_bytes += n * p.element_size()
            row[0] += n
        else:
            frozen += n
            frozen_bytes += n * p.element_size()
            row[1] += n
    # FSDP: the largest units gathered in bf16 (root = everything outside decoder layers)
    layer_sizes: list[int] = []
    for m in (parts["llm"], parts["t2c"], parts["echo"]):
        for mod in m.modules():
            if type(mod).__name__ == "LlamaDecoderLayer":
                layer_sizes.append(sum(p.numel() for p in mod.parameters()))
    root = total - sum(layer_sizes)
    n, T = N_GPUS, trainable
    bucket = 2 * min(5e8, T)
    mem = {
        "DDP": {"weights": frozen_bytes + trained_bytes, "grads": 4 * T, "optimizer": 8 * T,
                "buffers": 4 * T},
        "ZeRO-2": {"weights": 2 * total, "grads": 2 * T / n, "optimizer": 12 * T / n,
                   "buffers": 2 * bucket},
        "ZeRO-3": {"weights": 2 * total / n + 2 * min(1e9, total), "grads": 2 * T / n,
                   "optimizer": 12 * T / n, "buffers": bucket},
        "FSDP": {"weights": 4 * total / n + 2 * (root + 2 * max(layer_sizes)), "grads": 4 * T / n,
                 "optimizer": 8 * T / n, "buffers": 0.0},
    }
    return {"trainable": trainable, "frozen": frozen, "by_part": by_part, "memory": mem}


def recipe(preset: str, stage: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "recipes" / preset / f"{stage}.yaml").read_text())


def plan(preset: str, mfu: float, w: Workload) -> dict[str, Any]:
    r0 = yaml.safe_load((ROOT / "recipes" / preset / "s2t.yaml").read_text())
    cfg = load_config(str(ROOT / r0["model"]) if str(r0["model"]).endswith(".yaml") else r0["model"],
                      list(r0.get("overrides") or []))
    state_parts = build_parts(cfg)
    act_parts = build_parts(cfg, dtype_all=torch.bfloat16)
    out: dict[str, Any] = {"preset": preset, "mfu": mfu, "gpus": N_GPUS, "workload": asdict(w),
                           "stages": {}}
    for stage in ("s2t", "t2c", "echo", "echo_gold"):
        rc = recipe(preset, stage)
        tr = rc["train"]
        b, accum = int(tr["batch_size"]), int(tr.get("grad_accum", 1))
        parts_stage = "echo" if stage == "echo_gold" else stage  # same parts train
        st = state_bytes(state_parts, parts_stage)
        set_stage(act_parts, parts_stage)
        peak = step(act_parts, stage, b, shapes(stage, w.sources(stage)[0], w, peak=True), w)
        srcs = []
        for src in w.sources(stage):
            shp = shapes(stage, src, w, peak=False)
            one = step(act_parts, stage, 1, shp, w)
            tokens = shp["llm"] if stage != "t2c" else shp["text"] + shp["units"] + 3
            if stage in ("echo", "echo_gold"):
                tokens += shp["segments"] * (shp["segment_tokens"] + shp["segment_units"] + 3)
            flops = one.flops
            if stage == "echo":  # online pseudo-labels: the frozen T2C decodes Y' (KV cache)
                n_t2c = sum(p.numel() for n_, p in act_parts["t2c"].named_parameters()
                            if "embed_tokens" not in n_)
                flops += 2 * n_t2c * shp["segments"] * (shp["segment_tokens"] + shp["segment_units"])
            srcs.append({"name": src.name, "examples": src.count, "hours": src.hours,
                         "shape": shp, "tokens": tokens, "flops": flops})
        examples = sum(s["examples"] for s in srcs)
        step_examples = b * accum * N_GPUS
        steps_epoch = examples / step_examples
        epochs = int(tr["max_steps"]) / steps_epoch
        flops_epoch = sum(s["examples"] * s["flops"] for s in srcs)
        tokens_epoch = sum(s["examples"] * s["tokens"] for s in srcs)
        gpu_h = flops_epoch * epochs / (H100_BF16_PEAK * mfu) / 3600
        out["stages"][stage] = {
            "recipe": {k: tr.get(k) for k in ("batch_size", "grad_accum", "max_steps", "precision")},
            "trainable": st["trainable"], "frozen": st["frozen"], "by_part": st["by_part"],
            "memory": {k: {**v, "activations": peak.saved_bytes, "transient": peak.largest,
                           "total": sum(v.values()) + peak.saved_bytes + peak.largest}
                       for k, v in st["memory"].items()},
            "peak_shape": shapes(stage, w.sources(stage)[0], w, peak=True),
            "sources": srcs, "examples": examples, "global_batch": step_examples,
            "steps_per_epoch": steps_epoch, "epochs": epochs, "tokens_per_epoch": tokens_epoch,
            "flops_per_epoch": flops_epoch, "gpu_hours": gpu_h, "node_hours": gpu_h / N_GPUS,
        }
    return out


def fmt(p: dict[str, Any]) -> str:
    g = lambda x: f"{x / GB:.1f}"  # noqa: E731
    lines = [f"## EchoX-{p['preset'].upper()} on {p['gpus']} GPUs (meta-device count; "
             f"MFU {p['mfu']:.0%} of {H100_BF16_PEAK / 1e12:.0f} TFLOP/s bf16 per H100)", ""]
    lines += ["| stage | trainable | frozen | batch/GPU x accum | DDP | ZeRO-2 | ZeRO-3 | FSDP | "
              "of which activations |", "|---|---|---|---|---|---|---|---|---|"]
    for stage, s in p["stages"].items():
        m = s["memory"]
        lines.append(f"| {stage} | {s['trainable'] / 1e6:,.0f}M | {s['frozen'] / 1e6:,.0f}M | "
                     f"{s['recipe']['batch_size']} x {s['recipe']['grad_accum'] or 1} | "
                     + " | ".join(f"{g(m[k]['total'])} GB" for k in STRATEGIES)
                     + f" | {g(m['DDP']['activations'])} GB (+{g(m['DDP']['transient'])}) |")
    lines += ["", "Memory per GPU (GB): weights + grads + optimizer + buffers + activations + transient", ""]
    lines += ["| stage | strategy | weights | grads | optimizer | buffers | activations | transient | total |",
              "|---|---|---|---|---|---|---|---|---|"]
    for stage, s in p["stages"].items():
        for k, v in s["memory"].items():
            lines.append(f"| {stage} | {k} | " + " | ".join(g(v[c]) for c in (
                "weights", "grads", "optimizer", "buffers", "activations", "transient", "total")) + " |")
    lines += ["", "| stage | examples/epoch | tokens/epoch | global batch | steps/epoch | recipe steps "
              "(epochs) | PFLOP/epoch | GPU-hours (8xH100 node-hours) |", "|---|---|---|---|---|---|---|---|"]
    for stage, s in p["stages"].items():
        lines.append(f"| {stage} | {s['examples']:,} | {s['tokens_per_epoch'] / 1e6:,.0f}M | "
                     f"{s['global_batch']} | {s['steps_per_epoch']:,.0f} | {s['recipe']['max_steps']:,} "
                     f"({s['epochs']:.2f}) | {s['flops_per_epoch'] / 1e15:,.0f} | {s['gpu_hours']:,.1f} "
                     f"({s['node_hours']:,.2f}) |")
    lines += ["", "Per average example (planning shapes; FLOPs of forward + backward, Whisper forward "
              "included):", "", "| stage | source | examples | tokens | TFLOP |", "|---|---|---|---|---|"]
    for stage, s in p["stages"].items():
        for src in s["sources"]:
            lines.append(f"| {stage} | {src['name']} | {src['examples']:,} | {src['tokens']} | "
                         f"{src['flops'] / 1e12:.2f} |")
    lines += ["", "Trainable / frozen parameters by part (M):", "",
              "| stage | " + " | ".join(p["stages"]["s2t"]["by_part"]) + " |",
              "|---|" + "---|" * len(p["stages"]["s2t"]["by_part"])]
    for stage, s in p["stages"].items():
        lines.append(f"| {stage} | " + " | ".join(
            f"{t / 1e6:,.1f} / {f / 1e6:,.1f}" for t, f in s["by_part"].values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["3b", "8b"], default="3b",
                    help="reads recipes/<preset>/{s2t,t2c,echo}.yaml and their model config")
    ap.add_argument("--mfu", type=float, default=0.30,
                    help="model FLOPs utilisation assumed for GPU-hours (default 0.30)")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    if not 0 < args.mfu <= 1:
        ap.error(f"--mfu must be a fraction in (0, 1], got {args.mfu}")
    if args.json:  # before the run: a bad path would lose its results, an input be replaced
        from echox.fileio import check_out_path

        check_out_path(args.json, "--json", folder=False, inputs=[])
    torch.set_num_threads(1)
    p = plan(args.preset, args.mfu, Workload())
    print(fmt(p))
    if args.json:
        from echox.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(p, indent=1, default=str))
    return 0


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
