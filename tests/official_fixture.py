"""A tiny checkpoint in the released EchoX layout, built from scratch for the converter tests.

Same key names, config fields and tokenizer tokens as FreedomIntelligence's EchoX-3B/8B
folders (SPEC "Released checkpoints" / "Appendix"), with small shapes: a 2-layer Llama, a
2-layer Whisper (the audio tower, beside the folder as in the authors' README), the speech
adapter and the T2C built from the torch / transformers modules that the authors' names come
from (`nn.TransformerEncoder` wrapping one layer, `nn.MultiheadAttention`, `nn.Sequential`),
and a CodeHiFiGAN with few channels saved as fairseq does (`generator` with weight_g/weight_v).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

BOS, SH, EH, EOT, AUDIO = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>", "<audio_patch>")
# inner texts of the <|unit_...|> tokens: ▁ word starts, underscore-joined ids, some >= 1000,
# some pieces that continue a number of the previous token
UNIT_TEXTS = ["▁5", "▁17_3", "▁42_42_7", "8", "_9", "0", "▁100_2", "▁999", "▁1000", "▁1203_4",
              "_1500", "7_", "▁3_3", "▁250", "25", "_60", "▁61_62", "▁7", "_8_9", "▁12", "34",
              "▁56_78", "▁901", "▁1"]
VOCAB = 12900  # the LLM vocabulary (> 12800: the released T2C prefix ends with token 12800)
D, HEADS, KV, FFN, LAYERS = 32, 4, 2, 64, 2
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256}
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
            "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
            "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@dataclass
class Fixture:
    src: Path  # the authors' folder
    whisper: Path  # the audio tower beside it
    state: dict[str, torch.Tensor]  # every tensor written to the shards


def build_tokenizer():
    """Byte-level BPE + fillers up to VOCAB - 5, the Llama-3 specials and <audio_patch> (ids
    VOCAB-5 .. VOCAB-1), then the unit tokens from VOCAB on; it adds <|begin_of_text|> to each
    encoded text, as Llama-3's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i in range(len(vocab), VOCAB - 5):
        vocab[f"<filler_{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, SH, EH, EOT, AUDIO])
    assert tok.token_to_id(AUDIO) == VOCAB - 1
    tok.add_tokens([f"<|unit_{t}|>" for t in UNIT_TEXTS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT)
    fast.chat_template = TEMPLATE
    return fast


def llm_config(unit_model: str | None, tie: bool) -> dict:
    cfg = {
        "architectures": ["EchoXForCausalLM"], "model_type": "EchoX", "vocab_size": VOCAB,
        "hidden_size": D, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV, "hidden_act": "silu",
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": ROPE, "tie_word_embeddings": tie, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": VOCAB - 5, "eos_token_id": VOCAB - 2,
        "torch_dtype": "float32", "audio_tower": "./whisper-tiny-test", "adapter_size": 32,
        "unit_output": "finetune", "unit_vocab_size": len(UNIT_TEXTS),
    }
    if unit_model is not None:
        cfg["unit_model"] = unit_model
    return cfg


class _Speech(nn.Module):
    """The authors' speech-side module names (under `model.` in their checkpoints)."""

    def __init__(self, d_whisper: int) -> None:
        super().__init__()
        self.mm_projector1 = nn.Linear(2 * d_whisper, D)
        layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=2 * D, dropout=0.1, norm_first=True)
        self.asr_transformer_encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.lbm = nn.Module()
        self.lbm.encoder_attn = nn.MultiheadAttention(D, HEADS, dropout=0.1, batch_first=True)
        self.lbm.atten_layer_norm = nn.LayerNorm(D)
        self.out_norm = nn.LayerNorm(D)
        self.audio_feature_head = nn.Linear(D, VOCAB, bias=False)


def _t2c_state(cfg: dict, llm_embed: torch.Tensor, shared: bool) -> dict[str, torch.Tensor]:
    """unit_translator.*: a LlamaModel of the authors' size rule, its table, unit_embedding,
    adapter, lm_head and aligner_MLP."""
    from transformers import LlamaConfig, LlamaModel

    from echox.model.unit_decoder_authors import authors_t2c_sizes

    s = authors_t2c_sizes(cfg)
    h = s["hidden_size"]
    model = LlamaModel(LlamaConfig(
        vocab_size=VOCAB, hidden_size=h, intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"], head_dim=h // s["num_heads"], max_position_embeddings=2048,
        rope_theta=cfg["rope_theta"], rope_scaling=ROPE, rms_norm_eps=cfg["rms_norm_eps"]))
    model.embed_tokens = nn.Embedding(VOCAB, D)
    u = len(UNIT_TEXTS)
    t2u = nn.Module()
    t2u.model = model
    t2u.unit_embedding = nn.Linear(D, u, bias=False)
    t2u.adapter = nn.Linear(D, h)
    t2u.lm_head = nn.Linear(h, VOCAB + u, bias=False)
    t2u.aligner_MLP = nn.Sequential(nn.Linear(D, FFN), nn.ReLU(), nn.Dropout(0.1), nn.Linear(FFN, D))
    with torch.no_grad():
        model.embed_tokens.weight.copy_(llm_embed if shared else torch.randn(VOCAB, D))
        # Greedy decoding follows CHAIN, then stops: the layers write almost nothing into the
        # residual stream, so the last state is about RMSNorm(adapter(input embedding)), and
        # the head row of each chain token points along the state of the token before it.
        for layer in model.layers:
            layer.self_attn.o_proj.weight.mul_(1e-3)
            layer.mlp.down_proj.weight.mul_(1e-3)
        table = torch.cat([model.embed_tokens.weight, t2u.unit_embedding.weight])
        a = t2u.adapter(table[[tok_id(t) for t in ["\u010a", *CHAIN]]])
        state = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"])
        t2u.lm_head.weight.zero_()
        for prev, nxt in zip(state, [*CHAIN, EOT]):
            t2u.lm_head.weight[tok_id(nxt)] = 20.0 * prev / prev.norm()
    return {f"unit_translator.{k}": v for k, v in t2u.state_dict().items()}


CHAIN = ["<|unit_▁17_3|>", "<|unit_▁42_42_7|>", "<|unit_8|>", "<|unit__9|>", "<|unit_▁1000|>",
         "<|unit_7_|>", "<|unit_▁250|>"]
# "▁17_3▁42_42_78_9▁10007_▁250": the units 17 3 42 42 78 9 250 (10007 is dropped)
CHAIN_UNITS = [17, 3, 42, 42, 78, 9, 250]


def tok_id(token: str) -> int:
    """Ids of the fixture tokenizer: bytes, fillers, the 5 specials, then the unit tokens."""
    specials = [BOS, SH, EH, EOT, AUDIO]
    if token in specials:
        return VOCAB - 5 + specials.index(token)
    if token.startswith("<|unit_"):
        return VOCAB + UNIT_TEXTS.index(token[len("<|unit_"):-2])
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet()).index(token)


def _fairseq_vocoder(folder: Path) -> None:
    from echox.vocoder.code_hifigan import CodeHiFiGAN, CodeHiFiGANConfig

    cfg = CodeHiFiGANConfig(**{**CodeHiFiGANConfig.tiny().__dict__, "num_embeddings": 1000,
                               "upsample_rates": [10, 8], "upsample_kernel_sizes": [20, 16]})
    model = CodeHiFiGAN(cfg)
    state = {}
    for k, w in model.state_dict().items():
        if k.endswith(".weight") and not k.startswith(("dict.", "dur_predictor.", "spkr.")):
            state[k[:-7] + ".weight_g"] = w.reshape(w.shape[0], -1).norm(dim=1).reshape(
                (w.shape[0],) + (1,) * (w.dim() - 1))
            state[k[:-7] + ".weight_v"] = w.clone()
        else:
            state[k] = w.clone()
    torch.save({"generator": state}, folder / "g_00500000")
    raw = cfg.to_dict()
    raw.update({"segment_size": 8960, "num_mels": 80})  # training-only keys, as released
    (folder / "vocoder_config.json").write_text(json.dumps(raw))


def build_authors_folder(root: Path, seed: int = 0, shards: int = 2, fmt: str = "safetensors",
                         shared_table: bool = True, unit_model: str | None = "large",
                         tie: bool = False) -> Fixture:
    """root/EchoX-tiny (the checkpoint) and root/whisper-tiny-test (its audio tower)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from echox.hub import _build_tiny_whisper

    torch.manual_seed(seed)
    whisper = root / "whisper-tiny-test"
    if not whisper.is_dir():
        _build_tiny_whisper(whisper)
    src = root / "EchoX-tiny"
    src.mkdir(parents=True)
    cfg = llm_config(unit_model, tie)
    llama = LlamaForCausalLM(LlamaConfig.from_dict({**cfg, "model_type": "llama"}))
    state = {k: v for k, v in llama.state_dict().items() if not (tie and k == "lm_head.weight")}
    speech = _Speech(cfg["adapter_size"])
    with torch.no_grad():  # no parameter keeps its init value (LayerNorm 1/0 would hide mistakes)
        for p in speech.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state.update({f"model.{k}": v for k, v in speech.state_dict().items()})
    state.update(_t2c_state(cfg, state["model.embed_tokens.weight"], shared_table))
    state = {k: v.contiguous() for k, v in state.items()}

    names = sorted(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = {k: state[k] for k in names[i * per:(i + 1) * per]}
        if fmt == "safetensors":
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(src / fname), metadata={"format": "pt"})
        else:
            fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, src / fname)
        weight_map.update({k: fname for k in part})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (src / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    (src / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": VOCAB - 5, "eos_token_id": [VOCAB - 2], "do_sample": False}))
    build_tokenizer().save_pretrained(src)
    _fairseq_vocoder(src)
    (src / "trainer_state.json").write_text("{}")  # a file the conversion does not use
    return Fixture(src, whisper, state)
