"""`echox convert official SRC OUT`: import a released EchoX checkpoint (EchoX-3B / EchoX-8B).

SRC is the authors' Hugging Face folder: `config.json` (a Llama config plus `audio_tower`,
`adapter_size`, `unit_output`, `unit_vocab_size`, `unit_model`), safetensors or `.bin` shards,
the tokenizer (with `<audio_patch>` and the `<|unit_...|>` tokens), `vocoder_config.json` and
`g_00500000`. OUT is an EchoX bundle (`echox.infer.bundle`):

    config.json, model.safetensors, tokenizer/, checksums.json   the checkpoint: speech adapter,
                          T2C (= echo decoder) and denoiser; the config sets every flag that
                          makes our code compute what the released model computes
    llm/                  the LLM as a plain Hugging Face Llama folder (`llm.name_or_path: llm`)
    vocoder/              g_00500000 + vocoder_config.json, as released
    unit_language/        the `<|unit_...|>` tokens and the authors' unit-decoding rule
    conversion_report.json   every SRC tensor and where it went

Every SRC tensor is accounted for: it is written (to `llm/` or `model.safetensors`), or dropped
for a stated reason (a buffer that is recomputed, a table identical to one already written).
An unknown, missing or wrongly shaped tensor stops the conversion before anything is written.
Tensors are copied as raw bytes, one block at a time (`echox.convert.tensor_files`), so the
peak memory does not grow with the checkpoint. Names, shapes and the order of operations come
from the authors' public model code (FreedomIntelligence/EchoX, `models/echox_s2s.py`,
`models/t2ullama_cr_online.py`, `inference/echox_stream.py`); none of their code is used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from echox import __version__
from echox.config import (
    DEFAULT_SYSTEM_PROMPT,
    DenoiserConfig,
    EchoXConfig,
    EncoderConfig,
    LLMConfig,
    SpeechAdapterConfig,
    T2CConfig,
)
from echox.convert.tensor_files import (
    BinShards,
    SafetensorsWriter,
    TensorInfo,
    iter_bytes,
    read_safetensors_header,
    same_bytes,
)
from echox.errors import ConfigError, ConversionError, UnitError, VocoderError
from echox.fileio import atomic_dir, check_out_path, read_json_object
from echox.infer.bundle import UNIT_LANGUAGE_DIR, VOCODER_DIR
from echox.model.checkpoint import CHECKSUMS, CONFIG, FORMAT_VERSION, WEIGHTS, sha256_file
from echox.model.denoiser import DenoisingAdapter
from echox.model.speech_adapter import SpeechAdapter
from echox.model.unit_decoder_authors import AuthorsUnitDecoder, authors_t2c_sizes
from echox.units.unit_tokens import UnitTokens
from echox.vocoder.code_hifigan import CodeHiFiGAN, CodeHiFiGANConfig
from echox.vocoder.io import FAIRSEQ_CHECKPOINT, FAIRSEQ_CONFIG

AUDIO_TOKEN = "<audio_patch>"
# Llama-3 markers that the authors' prompt and T2C prefixes are made of (looked up by name)
BOS, START_HEADER, END_HEADER, EOT = ("<|begin_of_text|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "<|eot_id|>")
# The authors' T2C text prefix is written as ids in their code; all but the last are the
# tokens of [start_header] + tokenizer("speaker") + [end_header] + tokenizer("\n"), which we
# take from the tokenizer. The last, 12800, is an ordinary Llama-3 token where the pattern
# would suggest <|begin_of_text|> (128000); the released model runs with 12800, so we keep it.
TEXT_PREFIX_LAST_ID = 12800
ECHOX_FIELDS = ("audio_tower", "adapter_size", "unit_output", "unit_vocab_size", "unit_model")
REQUIRED = ("audio_tower", "adapter_size", "unit_output", "unit_vocab_size", "vocab_size",
            "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
# sizes a Llama config may leave out (head_dim also as null); where given, whole numbers >= 1
OPTIONAL_SIZES = ("max_position_embeddings", "num_key_value_heads", "head_dim")
# authors' name prefix -> ours (first match wins); other `model.*` / `lm_head.*` names are the LLM's
RENAMES = (
    ("model.mm_projector1.", "adapter.mm_projector1."),
    ("model.asr_transformer_encoder.layers.0.", "adapter.asr_transformer_encoder."),
    ("model.lbm.encoder_attn.", "adapter.lbm."),
    ("model.lbm.atten_layer_norm.", "adapter.atten_layer_norm."),
    ("model.out_norm.", "adapter.out_norm."),
    ("model.audio_feature_head.", "adapter.audio_feature_head."),
    ("unit_translator.aligner_MLP.", "denoiser.net."),
    ("unit_translator.", "echo."),
)
T2C_TABLE, LLM_TABLE = "unit_translator.model.embed_tokens.weight", "model.embed_tokens.weight"


@dataclass
class Source:
    folder: Path
    config: dict[str, Any]
    tokenizer: Any
    tensors: dict[str, TensorInfo]
    shards: list[Path]
    vocoder: Path
    vocoder_config: Path
    bins: BinShards = field(default_factory=BinShards)


# ---- reading the source --------------------------------------------------------------------


def _shards(src: Path) -> list[Path]:
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (src / index).is_file():
            try:
                weight_map = json.loads((src / index).read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
                if not all(isinstance(n, str) for n in names):
                    raise TypeError("its weight_map values must be file names")
                # a shard beside the index, as the hub lays them out (../x read another folder)
                outside = next((n for n in names if os.path.basename(n) != n or n in (".", "..")), None)
                if outside is not None:
                    raise TypeError(f"its weight_map names {outside!r}, not a file beside it")
            except (ValueError, RecursionError, KeyError, AttributeError,
                    TypeError) as e:
                raise ConversionError(f"{src / index}: not a weight index ({e})") from e
            missing = [n for n in names if not os.path.isfile(src / n)]  # (False for a name the OS refuses)
            if missing:
                raise ConversionError(f"{src}: shard {missing[0]} named in {index} is missing"
                                      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            return [src / n for n in names]
        if (src / single).is_file():
            return [src / single]
    raise ConversionError(f"{src}: no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])")


def read_source(src: Path) -> Source:
    """config.json, tokenizer, shard headers and vocoder files of an authors' folder."""
    from transformers import AutoTokenizer

    if not src.is_dir():
        raise ConversionError(f"source folder not found: {src}")
    try:
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConversionError(f"{src}: no config.json") from e
    except (ValueError, RecursionError) as e:
        raise ConversionError(f"{src / 'config.json'}: not JSON ({e})") from e
    except OSError as e:  # a folder, no permission
        raise ConversionError(f"{src / 'config.json'}: cannot read it ({e.strerror or e})") from e
    if not isinstance(config, dict):
        raise ConversionError(f"{src / 'config.json'}: not an EchoX config (a JSON object), got "
                              f"{type(config).__name__}")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ConversionError(f"{src / 'config.json'}: not an EchoX config, it lacks {missing}")
    texts = ("audio_tower", "unit_output")  # the rest are whole numbers
    wrong = [k for k in REQUIRED if not isinstance(config[k], str if k in texts else int)
             or isinstance(config[k], bool)]
    if wrong:
        raise ConversionError(f"{src / 'config.json'}: wrong type of "
                              + ", ".join(f"{k} ({config[k]!r}: expected "
                                          f"{'a string' if k in texts else 'a whole number'})"
                                          for k in wrong))
    huge = [k for k in REQUIRED if k not in texts and not 0 < config[k] < 2**31]
    if huge:
        raise ConversionError(f"{src / 'config.json'}: out of range: "
                              + ", ".join(f"{k} ({config[k]!r}: expected 1 to {2**31 - 1})" for k in huge))
    bad = [k for k in OPTIONAL_SIZES if config.get(k) is not None and (
        not isinstance(config[k], int) or isinstance(config[k], bool) or not 0 < config[k] < 2**31)]
    if bad:
        raise ConversionError(f"{src / 'config.json'}: not a size: "
                              + ", ".join(f"{k} ({config[k]!r}: expected a whole number from 1 to "
                                          f"{2**31 - 1})" for k in bad))
    try:  # the LLM's own config: its checks name config.json, not the tokenizer loaded with it
        from transformers import LlamaConfig

        llm_cfg = LlamaConfig.from_dict(llm_config(config))
    except Exception as e:  # noqa: BLE001 - pydantic-style validation fails in many ways
        why = " ".join(str(e).split())
        raise ConversionError(f"{src / 'config.json'}: not a valid LLM config ({type(e).__name__}: "
                              f"{why})") from e
    if not any((src / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ConversionError(f"{src}: no tokenizer (tokenizer.json / tokenizer_config.json)")
    try:  # with the LLM's config: transformers does not know the model type "EchoX"
        tok = AutoTokenizer.from_pretrained(src, config=llm_cfg)
    except Exception as e:  # noqa: BLE001 - tokenizer loading fails in many ways
        why = " ".join(str(e).split())  # one line: pydantic-style errors span several
        raise ConversionError(f"{src}: cannot load the tokenizer ({type(e).__name__}: {why})") from e
    shards = _shards(src)
    bins = BinShards()
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        infos = read_safetensors_header(shard) if shard.suffix == ".safetensors" else bins.infos(shard)
        for name, info in infos.items():
            if name in tensors:
                raise ConversionError(f"{src}: tensor {name} is in both {tensors[name].file.name} and {shard.name}")
            tensors[name] = info
    vocoder_cfg = src / "vocoder_config.json"
    found = sorted(p for p in src.glob("g_*") if p.is_file())
    vocoder = src / "g_00500000" if (src / "g_00500000").is_file() else (found[-1] if found else None)
    if vocoder is None or not vocoder_cfg.is_file():
        raise ConversionError(f"{src}: no vocoder (g_00500000 + vocoder_config.json)")
    return Source(src, config, tok, tensors, shards, vocoder, vocoder_cfg, bins)


# ---- what the released model computes, as our config -----------------------------------


def _llm_dtype(config: dict[str, Any]) -> str:
    d = str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")
    return d if d in ("float32", "bfloat16", "float16") else "float32"


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    try:
        theta, scaling = _rope_values(config)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"config.json: rope_theta is not a number ({e})") from e
    if not 0 < theta < math.inf:  # NaN wrote a bundle whose every answer failed to sample
        raise ConversionError(f"config.json: rope_theta must be a finite number > 0, got {theta}")
    return theta, scaling


def _rope_values(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    rp = config.get("rope_parameters")
    if isinstance(rp, dict):  # a transformers >= 5 config
        rest = {k: v for k, v in rp.items() if k != "rope_theta"}
        return float(rp.get("rope_theta", 10000.0)), (rest if rest.get("rope_type", "default") != "default" else None)
    return float(config.get("rope_theta", 10000.0)), config.get("rope_scaling")


def _audio_tower(name: str, src: Path, override: str | None) -> tuple[str, str]:
    """The Whisper the config names, as a folder or hub id, and how it was found."""
    if override:
        p = Path(override).expanduser()
        if os.path.isdir(p):
            return str(p.resolve()), "--audio-tower"
        if p.is_absolute() or override.startswith((".", "~")) or override.count("/") > 1:
            # a path, not a hub id (org/name): it was kept and failed only at the first chat
            raise ConversionError(f"--audio-tower {override}: no such folder")
        return override, "--audio-tower"
    p = Path(name).expanduser()
    for cand in ([p] if p.is_absolute() else [p, src / p, src.parent / p]):
        if os.path.isdir(cand):
            return str(cand.resolve()), f"config.json audio_tower {name!r}, found at {cand}"
    if p.name.startswith("whisper-") and (p.is_absolute() or name.startswith(".") or "/" not in name):
        return f"openai/{p.name}", f"config.json audio_tower {name!r} is not here: the hub id openai/{p.name}"
    return name, f"config.json audio_tower {name!r}"


def _check_tower(tower: str, adapter_size: int) -> None:
    cfg = Path(tower) / "config.json"
    if os.path.isfile(cfg):
        d = read_json_object(cfg, ConversionError, "audio tower config").get("d_model")
        if d is None:  # another model's folder (the authors' own, say) was taken
            raise ConversionError(f"audio tower {tower}: its config.json has no d_model; give "
                                  "a Whisper model's folder")
        if not isinstance(d, int) or isinstance(d, bool):
            raise ConversionError(f"audio tower {tower}: config.json's d_model is {d!r}, not a "
                                  "whole number")
        if d != adapter_size:
            raise ConversionError(f"audio tower {tower} has d_model {d} but config.json's "
                                  f"adapter_size is {adapter_size}")


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text)["input_ids"])  # with the tokenizer's own special tokens, as the authors call it


def t2c_prefixes(tok: Any) -> tuple[list[str], list[str]]:
    """The released T2C's text and unit prefixes as token strings of `tok` (authors' layout:
    [start_header] tokenizer("speaker") [end_header] tokenizer("\\n") + the id 12800 before the
    condition; [eot] + the same header after it)."""
    vocab = tok.get_vocab()
    header = [vocab[START_HEADER], *_ids(tok, "speaker"), vocab[END_HEADER], *_ids(tok, "\n")]
    if TEXT_PREFIX_LAST_ID >= len(vocab):
        raise ConversionError(f"the tokenizer has {len(vocab)} tokens; the released T2C's text "
                              f"prefix ends with token {TEXT_PREFIX_LAST_ID}")
    text = header + [TEXT_PREFIX_LAST_ID]
    unit = [vocab[EOT]] + header
    return tok.convert_ids_to_tokens(text), tok.convert_ids_to_tokens(unit)


def authors_chat_template(audio_token: str = AUDIO_TOKEN) -> str:
    """The released model's prompt layout as a chat template. The authors build it from pieces
    `tokenizer(x).input_ids`, and a Llama-3 tokenizer starts every such piece with
    <|begin_of_text|>: system = B SH B"system" EH B"\\n" B text EOT (after a leading B), a user
    turn = SH B"user" EH B"\\n" AUDIO B text EOT with speech, SH B"user" EH B text EOT without,
    an assistant turn = SH B"assistant" EH B"\\n" B text EOT; the generation prompt stops after
    B"\\n". Tokenized as one text, each special token starts a new piece, so the ids agree."""
    t = r"""{%- set B = "@B" -%}{%- set SH = "@SH" -%}{%- set EH = "@EH" -%}{%- set EOT = "@EOT" -%}
{%- set A = "@A" -%}
{%- for m in messages -%}
{%- if m['role'] == 'system' -%}{{ B ~ SH ~ B ~ 'system' ~ EH ~ B ~ '\n' ~ B ~ m['content'] ~ EOT }}
{%- elif m['role'] == 'user' and m['content'].startswith(A) -%}
{%- set rest = m['content'][A|length:] -%}{%- if rest.startswith('\n') -%}{%- set rest = rest[1:] -%}{%- endif -%}
{{ SH ~ B ~ 'user' ~ EH ~ B ~ '\n' ~ A ~ B ~ rest ~ EOT }}
{%- elif m['role'] == 'user' -%}{{ SH ~ B ~ 'user' ~ EH ~ B ~ m['content'] ~ EOT }}
{%- elif m['role'] == 'assistant' -%}{{ SH ~ B ~ 'assistant' ~ EH ~ B ~ '\n' ~ B ~ m['content'] ~ EOT }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ SH ~ B ~ 'assistant' ~ EH ~ B ~ '\n' }}{%- endif -%}"""
    for key, val in (("@SH", START_HEADER), ("@EH", END_HEADER), ("@EOT", EOT), ("@B", BOS),
                     ("@A", audio_token)):
        t = t.replace(key, val)
    return t


def echox_config(src: Source, tower: str, shared: bool) -> EchoXConfig:
    """Our config for the released model: every flag set to the authors' computation."""
    c, tok = src.config, src.tokenizer
    text_prefix, unit_prefix = t2c_prefixes(tok)
    rope_theta, rope_scaling = _rope(c)
    return EchoXConfig(
        encoder=EncoderConfig(name_or_path=tower, window_seconds=None),  # the full 30 s window
        adapter=SpeechAdapterConfig(
            num_heads=int(c["num_attention_heads"]), ffn_mult=2, dropout=0.1, lookback_dropout=0.1,
            drop_blank=False,  # shrink keeps one frame per blank run
            ctc_head="linear", blank_head=False,
            lookback_keys="kept",  # key padding mask = not kept
            mask_padding=False,  # speech padded to the window, every frame counts
            encoder_attention="self",  # their layer attends across audio turns, not frames
        ),
        llm=LLMConfig(name_or_path="llm", dtype=_llm_dtype(c), system_prompt=DEFAULT_SYSTEM_PROMPT,
                      audio_token=AUDIO_TOKEN, use_lora=False, trainable=False,
                      resize_embeddings=False),
        t2c=T2CConfig(
            layout="authors", unit_vocab_size=int(c["unit_vocab_size"]), max_positions=2048,
            max_units_per_token=2048,  # the authors' limit is 2048 new tokens, whatever the input
            rope_theta=rope_theta, rope_scaling=rope_scaling,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)), text_prefix=text_prefix,
            unit_prefix=unit_prefix, eos_token=tok.eos_token, shared_embedding=shared,
            **authors_t2c_sizes(c),
        ),
        denoiser=DenoiserConfig(ff_size=int(c["intermediate_size"]), dropout=0.1),
    )


# ---- the plan: every source tensor's destination ------------------------------------------


def _meta_shapes(cfg: EchoXConfig, src: Source) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]], bool]:
    """Shapes our parts and the LLM have for this config (built on the meta device)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = src.config
    d, v = int(c["hidden_size"]), int(c["vocab_size"])
    t2c = T2CConfig(**{**cfg.t2c.__dict__, "shared_embedding": False})
    with torch.device("meta"):
        parts = {
            "adapter": SpeechAdapter(int(c["adapter_size"]), d, v, 0, num_heads=cfg.adapter.num_heads),
            "denoiser": DenoisingAdapter(d, cfg.denoiser.ff_size),
            "echo": AuthorsUnitDecoder(t2c, d, v, src.tokenizer),
        }
        llm_cfg = LlamaConfig.from_dict(llm_config(c))
        llm = LlamaForCausalLM(llm_cfg)
    ours = {f"{p}.{k}": tuple(t.shape) for p, m in parts.items() for k, t in m.state_dict().items()}
    return ours, {k: tuple(t.shape) for k, t in llm.state_dict().items()}, bool(llm_cfg.tie_word_embeddings)


def llm_config(c: dict[str, Any]) -> dict[str, Any]:
    """The LLM's part of the authors' config, as a plain Llama config."""
    out = {k: v for k, v in c.items() if k not in ECHOX_FIELDS + ("auto_map", "_name_or_path")}
    out.update(model_type="llama", architectures=["LlamaForCausalLM"])
    return out


def _source_name(ours: str) -> str:
    """The authors' name of one of our tensors (for messages)."""
    old, new = next(((o, n) for o, n in RENAMES if ours.startswith(n)), ("", ""))
    return old + ours[len(new):]


@dataclass
class Entry:
    key: str
    info: TensorInfo
    to: str  # "model" (our model.safetensors), "llm" (llm/ shards) or "dropped"
    name: str = ""  # the name there
    why: str = ""


FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})  # the weights a converted model can hold


def plan(src: Source, cfg: EchoXConfig) -> list[Entry]:
    """Every source tensor's destination; any unknown, missing, misshapen or non-float one is
    an error."""
    try:  # a config.json transformers cannot build: num_key_value_heads 0, an unknown hidden_act
        ours, llm, tied = _meta_shapes(cfg, src)
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        raise ConversionError(f"{src.folder / 'config.json'}: the model it describes cannot be "
                              f"built ({type(e).__name__}: {' '.join(str(e).split())})") from e
    if cfg.t2c.shared_embedding:
        ours.pop("echo.model.embed_tokens.weight")
    required_llm = {k for k in llm if not (tied and k == "lm_head.weight")}
    entries, unknown, bad, bad_dtype = [], [], [], []
    for key in sorted(src.tensors):
        info = src.tensors[key]
        mine = next((new + key[len(old):] for old, new in RENAMES if key.startswith(old)), None)
        if key == T2C_TABLE and cfg.t2c.shared_embedding:
            e = Entry(key, info, "dropped", why=f"identical to {LLM_TABLE}: the T2C reads the "
                                                 "LLM's table (t2c.shared_embedding)")
            want = llm[LLM_TABLE]
        elif mine is not None and mine in ours:
            e, want = Entry(key, info, "model", mine), ours[mine]
        elif key in llm and key.startswith(("model.", "lm_head.")):
            if tied and key == "lm_head.weight":
                e = Entry(key, info, "dropped", why="tied to model.embed_tokens.weight "
                                                     "(tie_word_embeddings), as when the authors load it")
            else:
                e = Entry(key, info, "llm", key)
            want = llm[key]
        elif key.endswith("rotary_emb.inv_freq"):
            entries.append(Entry(key, info, "dropped", why="rotary buffer, recomputed from the config"))
            continue
        else:
            unknown.append(key)
            continue
        if info.shape != want:
            bad.append(f"{key} is {list(info.shape)} in {info.file.name}, config.json's sizes give {list(want)}")
        elif info.dtype not in FLOAT_DTYPES:  # int or bool weights converted, and the T2C never stopped
            bad_dtype.append(f"{key} is {info.dtype} in {info.file.name}")
        entries.append(e)
    where = src.folder
    if unknown:
        raise ConversionError(f"{where}: {len(unknown)} tensor(s) that the released EchoX layout "
                              f"does not have, e.g. {', '.join(unknown[:3])}")
    if bad:
        raise ConversionError(f"{where}: wrong shape: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    if bad_dtype:
        raise ConversionError(f"{where}: weights must be floating point ({', '.join(sorted(FLOAT_DTYPES))}): "
                              f"{bad_dtype[0]}" + (f" (and {len(bad_dtype) - 1} more)" if len(bad_dtype) > 1 else ""))
    have = {e.name for e in entries if e.to == "model"} | {e.key for e in entries if e.to != "model"}
    missing = sorted({_source_name(k) for k in set(ours) - have} | (required_llm - have))
    if missing:
        raise ConversionError(f"{where}: {len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])} "
                              "(a shard incomplete, or a config.json that does not fit the weights)")
    return entries


# ---- writing --------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1 << 20) if sys.platform == "darwin" else kb / 1024  # macOS reports bytes


def _write_llm(tmp: Path, src: Source, entries: list[Entry]) -> None:
    from transformers import LlamaConfig

    d = tmp / "llm"
    d.mkdir()
    LlamaConfig.from_dict(llm_config(src.config)).save_pretrained(d)
    if (src.folder / "generation_config.json").is_file():
        shutil.copyfile(src.folder / "generation_config.json", d / "generation_config.json")
    by_shard: dict[Path, list[Entry]] = {}
    for e in entries:
        if e.to == "llm":
            by_shard.setdefault(e.info.file, []).append(e)
    n = len(by_shard)
    weight_map, total = {}, 0
    for i, (shard, group) in enumerate(sorted(by_shard.items()), start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        group.sort(key=lambda e: e.info.start)  # sequential reads
        w = SafetensorsWriter(d / name, [(e.name, e.info.dtype, e.info.shape) for e in group])
        for e in group:
            w.write(e.name, iter_bytes(e.info, src.bins))
            weight_map[e.name] = name
        w.close()
        total += w.total
        for e in group:
            e.name = f"llm/{name}:{e.name}"
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def convert_official(src_dir: str | Path, out_dir: str | Path, audio_tower: str | None = None,
                     prompt: str = "authors") -> dict[str, Any]:
    """Convert; return the report (also written to OUT/conversion_report.json)."""
    if prompt not in ("authors", "template"):
        raise ConversionError(f"--prompt must be 'authors' or 'template', got {prompt!r}")
    src = read_source(Path(src_dir).expanduser())
    c, tok = src.config, src.tokenizer
    vocab = tok.get_vocab()
    v, u = int(c["vocab_size"]), int(c["unit_vocab_size"])
    absent = [t for t in (BOS, START_HEADER, END_HEADER, EOT) if t not in vocab]
    if absent or tok.eos_token is None:
        raise ConversionError(f"{src.folder}: the tokenizer lacks the Llama-3 tokens {absent or ['eos']} "
                              "that the released prompt and T2C use")
    if vocab.get(AUDIO_TOKEN, v) >= v:
        raise ConversionError(f"{src.folder}: the tokenizer has no {AUDIO_TOKEN} below the vocabulary "
                              f"size {v} (the CTC blank and speech placeholder)")
    if prompt == "template" and not tok.chat_template:
        raise ConversionError(f"{src.folder}: --prompt template, but the tokenizer has no chat template")
    try:
        voc_cfg = CodeHiFiGANConfig.from_json(src.vocoder_config)
        units = UnitTokens.from_tokenizer(tok, v, u, num_units=voc_cfg.num_embeddings)
    except (UnitError, VocoderError) as e:
        raise ConversionError(f"{src.folder}: {e}") from e
    tower, tower_note = _audio_tower(str(c["audio_tower"]), src.folder, audio_tower)
    _check_tower(tower, int(c["adapter_size"]))
    shared = (T2C_TABLE in src.tensors and LLM_TABLE in src.tensors
              and same_bytes(src.tensors[T2C_TABLE], src.tensors[LLM_TABLE], src.bins))
    try:
        cfg = echox_config(src, tower, shared)
    except ConfigError as e:  # "t2c.num_kv_heads: must divide num_heads" named neither file nor field
        raise ConversionError(f"{src.folder / 'config.json'}: its sizes make no valid model "
                              f"(num_attention_heads, num_key_value_heads, hidden_size, ...: {e})") from e
    entries = plan(src, cfg)
    try:  # the vocoder must load before anything is written

        CodeHiFiGAN.from_fairseq(src.vocoder, src.vocoder_config)
    except VocoderError as e:
        raise ConversionError(f"{src.vocoder}: {e}") from e

    out = Path(out_dir).expanduser()
    for what, path in (("the checkpoint being converted", src.folder), ("the audio tower", tower)):
        if os.path.isdir(path) and (out.resolve() == Path(path).resolve()
                                    or out.resolve() in Path(path).resolve().parents):
            raise ConversionError(f"OUT {out} holds {what} ({path}): replacing it would delete "
                                  "it; give another OUT")
    with atomic_dir(out) as tmp:
        mine = sorted((e for e in entries if e.to == "model"), key=lambda e: (str(e.info.file), e.info.start))
        w = SafetensorsWriter(tmp / WEIGHTS, [(e.name, e.info.dtype, e.info.shape) for e in mine])
        for e in mine:
            w.write(e.name, iter_bytes(e.info, src.bins))
        w.close()
        for e in mine:
            e.name = f"{WEIGHTS}:{e.name}"
        _write_llm(tmp, src, entries)
        if prompt == "authors":
            tok.chat_template = authors_chat_template()
        tok.save_pretrained(tmp / "tokenizer")
        (tmp / VOCODER_DIR).mkdir()
        shutil.copyfile(src.vocoder, tmp / VOCODER_DIR / FAIRSEQ_CHECKPOINT)
        shutil.copyfile(src.vocoder_config, tmp / VOCODER_DIR / FAIRSEQ_CONFIG)
        units.save(tmp / UNIT_LANGUAGE_DIR)
        used = {p.name for p in src.shards} | {"config.json", src.vocoder.name, src.vocoder_config.name}
        report = {
            "source": str(src.folder), "echox_version": __version__,
            "audio_tower": tower, "audio_tower_from": tower_note, "prompt": prompt,
            "t2c_shared_embedding": shared,
            "t2c_text_prefix": cfg.t2c.text_prefix, "t2c_unit_prefix": cfg.t2c.unit_prefix,
            "unit_tokens": repr(units),
            "counts": {to: sum(e.to == to for e in entries) for to in ("model", "llm", "dropped")},
            "tensors": [{"key": e.key, "shard": e.info.file.name, "dtype": e.info.dtype,
                         "shape": list(e.info.shape), "to": e.name if e.to != "dropped" else "dropped",
                         **({"why": e.why} if e.why else {})} for e in entries],
            "files_not_used": sorted(p.name for p in src.folder.iterdir()
                                     if p.is_file() and p.name not in used and not p.name.startswith(
                                         ("tokenizer", "special_tokens", "chat_template", "model.safetensors.index",
                                          "pytorch_model.bin.index", "generation_config", "added_tokens"))),
        }
        meta = {"format": "echox", "format_version": FORMAT_VERSION, "echox_version": __version__,
                "config": cfg.to_dict(), "trained_stages": ["s2t", "t2c", "echo"],
                "source": {"kind": "released EchoX (FreedomIntelligence)", "folder": str(src.folder),
                           "unit_model": c.get("unit_model"), "unit_output": c.get("unit_output")}}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
        report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        (tmp / "conversion_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
        # the LLM's shards (most of the bytes) are not hashed: verifying 16 GB on every load
        # would take longer than loading; safetensors checks their sizes when they are read
        sums = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*"))
                if p.is_file() and not (p.parent.name == "llm" and p.suffix == ".safetensors")}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2))
    return report


def cmd_convert_official(args: Any) -> int:
    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        raise ConversionError(f"{out} exists; pass --force to replace it")
    src = Path(args.src).expanduser().resolve()
    if out.resolve() == src or out.resolve() in src.parents:
        raise ConversionError(f"OUT {out} holds SRC {args.src}: replacing it would delete the "
                              "checkpoint being converted; give another OUT")
    if src in out.resolve().parents:  # a bundle written into the authors' folder, an input
        raise ConversionError(f"OUT {out} lies inside SRC {args.src}: the bundle would be "
                              "written into the checkpoint being converted; give another OUT")
    check_out_path(out, "OUT")  # the bundle is a folder
    report = convert_official(args.src, out, audio_tower=args.audio_tower, prompt=args.prompt)
    n = report["counts"]
    print(f"wrote {out}: {n['llm']} LLM tensors -> llm/, {n['model']} speech/T2C tensors -> "
          f"model.safetensors, {n['dropped']} dropped (reasons in conversion_report.json); "
          f"audio tower {report['audio_tower']}; peak memory {report['peak_rss_mb']:.0f} MB")
    return 0


def official_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="the authors' folder (config.json, shards, tokenizer, g_00500000, "
                               "vocoder_config.json)")
    p.add_argument("out", help="bundle folder to write")
    p.add_argument("--audio-tower", help="the Whisper encoder (folder or hub id) when config.json's "
                                         "audio_tower is not found (default: it, else openai/<its name>)")
    p.add_argument("--prompt", choices=["authors", "template"], default="authors",
                   help="prompt layout: the authors' (default; the one the model was trained on) or "
                        "the tokenizer's own chat template")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")

