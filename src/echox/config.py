"""Typed, validated configuration for EchoX.

Every knob lives in a dataclass; named presets (`tiny-random`, `tiny`, `3b`, `8b`) are
functions; YAML files and dotted CLI overrides (``llm.lora.r=16``) map onto the same classes.
Nothing here hard-codes token ids or paths: base models are hub ids, local folders or the
built-in names that :mod:`echox.hub` resolves.
"""

from __future__ import annotations

import dataclasses
import os
import math
import re
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Union, get_args, get_origin, get_type_hints

import yaml

from echox.errors import ConfigError
from echox.fileio import read_json_object

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and speech assistant. You are able to understand the speech "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)

MAX_BEAMS = 64  # text or unit beam search keeps this many rows per answer: more is no setting


def _check(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: {msg}")


#: The longest question a model config or `--max-audio-seconds` may allow. The speech adapter
#: attends over all of a question's frames at once: time and memory grow with the square of its
#: length, and a question of tens of minutes held gigabytes and the process for minutes, deaf
#: to SIGTERM.
MAX_AUDIO_SECONDS_CAP = 600.0


@dataclass
class EncoderConfig:
    """Frozen Whisper encoder. `name_or_path`: hub id, local folder or built-in name."""

    name_or_path: str = "openai/whisper-large-v3"
    trainable: bool = False
    # None = the model's native window (30 s); shorter windows speed up short utterances
    window_seconds: float | None = None
    # longest speech accepted (seconds); a clip longer than one window is encoded as
    # consecutive windows. `--max-audio-seconds` raises it for `echox chat` / `echox demo`
    max_seconds: float = 30.0

    def validate(self, path: str = "encoder") -> None:
        _check(bool(self.name_or_path), f"{path}.name_or_path", "must be a non-empty string")
        _check(self.window_seconds is None or 0 < self.window_seconds < math.inf,
               f"{path}.window_seconds", f"must be a finite number > 0 or null, got {self.window_seconds}")
        _check(self.max_seconds > 0 and self.max_seconds != float("inf"), f"{path}.max_seconds",
               f"must be a finite number > 0, got {self.max_seconds}")
        _check(self.max_seconds <= MAX_AUDIO_SECONDS_CAP, f"{path}.max_seconds",
               f"must be at most {MAX_AUDIO_SECONDS_CAP:g} s (the speech adapter attends over a "
               f"whole question at once; split longer audio), got {self.max_seconds:g}")


@dataclass
class SpeechAdapterConfig:
    """Pair-concat → Linear → 1 Transformer layer → LayerNorm, CTC head, shrink, look-back."""

    num_heads: int = 8
    ffn_mult: int = 2
    dropout: float = 0.0
    lookback_dropout: float = 0.1
    drop_blank: bool = False  # authors keep one frame per blank run; dropping them is optional
    # False: no CTC shrink, every valid frame goes to the LLM (the no-shrink baseline; the CTC
    # loss still trains the head)
    shrink: bool = True
    # "linear": a bias-free Linear to the LLM vocabulary (authors); "tied": reuse the LLM's
    # frozen output embeddings (no extra parameters: 28M fewer for SmolLM2)
    ctc_head: str = "linear"
    # with a tied head: the blank logit from a small trainable Linear (the tied blank row, the
    # placeholder's frozen embedding, cannot learn; a tied head then never predicted a blank)
    blank_head: bool = False
    # 0: the CTC softmax runs over the LLM's whole vocabulary. N: over N token ids only (the
    # blank among them), stored with the weights as `adapter.ctc_columns`; `train.ctc_vocab:
    # transcripts` picks the ids of the training transcripts. A 49k-way softmax per frame is
    # most of a CTC-only step on a CPU (docs/training.md)
    ctc_vocab: int = 0
    # the look-back's keys: "kept" frames of F only, or "all" valid frames of F
    lookback_keys: str = "kept"
    # subtracted from the blank's logit when the shrink picks each frame's CTC argmax (never in
    # the CTC loss): > 0 keeps frames where the head hesitates between the blank and a token,
    # the blank penalty that CTC decoders use against deletions (docs/results.md, session 34)
    shrink_blank_penalty: float = 0.0
    mask_padding: bool = True  # False = authors' behaviour: all frames of the 30 s window count
    # the adapter's Transformer layer: "frames" attend to each other; "self": each frame attends
    # only to itself, which is what the released checkpoints compute (their layer is built
    # sequence-first and is given batch-first tensors, so it attends across the audio turns
    # it is given at once; their inference code gives it one turn at a time: one key per query)
    encoder_attention: str = "frames"
    # more Transformer layers after that one (ours, not the authors'): the one layer's adapter
    # could not fit its own training transcripts (docs/results.md, session 16). They start as
    # the identity, so `--init` from a trained adapter with `--set model.adapter.extra_layers=N`
    # continues from what it computed
    extra_layers: int = 0
    trainable: bool = True

    def validate(self, path: str = "adapter") -> None:
        _check(self.num_heads >= 1, f"{path}.num_heads", f"must be >= 1, got {self.num_heads}")
        _check(self.ffn_mult >= 1, f"{path}.ffn_mult", f"must be >= 1, got {self.ffn_mult}")
        _check(self.ctc_vocab == 0 or self.ctc_vocab >= 2, f"{path}.ctc_vocab",
               f"must be 0 (the whole vocabulary) or >= 2, got {self.ctc_vocab}")
        _check(0 <= self.extra_layers <= 64, f"{path}.extra_layers",  # 10**8 hung building them
               f"must be in [0, 64], got {self.extra_layers}")
        _check(self.ctc_head in ("linear", "tied"), f"{path}.ctc_head",
               f"must be 'linear' or 'tied', got {self.ctc_head!r}")
        _check(self.lookback_keys in ("kept", "all"), f"{path}.lookback_keys",
               f"must be 'kept' or 'all', got {self.lookback_keys!r}")
        _check(self.shrink_blank_penalty >= 0, f"{path}.shrink_blank_penalty",
               f"must be >= 0, got {self.shrink_blank_penalty}")
        _check(self.encoder_attention in ("frames", "self"), f"{path}.encoder_attention",
               f"must be 'frames' or 'self', got {self.encoder_attention!r}")
        for name in ("dropout", "lookback_dropout"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, f"{path}.{name}", f"must be in [0, 1), got {v}")


@dataclass
class LoraConfig:
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )

    def validate(self, path: str = "llm.lora") -> None:
        _check(self.r >= 1, f"{path}.r", f"must be >= 1, got {self.r}")
        _check(self.alpha >= 1, f"{path}.alpha", f"must be >= 1, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"{path}.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) > 0, f"{path}.target_modules", "must not be empty")


@dataclass
class LLMConfig:
    """Any Hugging Face causal LM with a chat template, trained with LoRA."""

    name_or_path: str = "meta-llama/Llama-3.2-3B-Instruct"
    dtype: str = "float32"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    audio_token: str = "<audio_patch>"
    use_lora: bool = True
    trainable: bool = True  # LoRA (or the full LLM when use_lora is false)
    # grow the LLM's embedding tables for tokens the tokenizer has beyond them (the audio
    # placeholder); False when the LLM folder already holds every row it reads (an imported
    # released model: its tokenizer's unit tokens belong to the T2C, not to the LLM)
    resize_embeddings: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, path: str = "llm") -> None:
        _check(bool(self.name_or_path), f"{path}.name_or_path", "must be a non-empty string")
        _check(
            self.dtype in ("float32", "bfloat16", "float16"),
            f"{path}.dtype",
            f"must be one of float32, bfloat16, float16; got {self.dtype!r}",
        )
        _check(bool(self.audio_token.strip()), f"{path}.audio_token", "must be a non-empty string")
        self.lora.validate(f"{path}.lora")


@dataclass
class T2CConfig:
    """Small decoder-only Llama turning text (or echo) embeddings into speech units."""

    hidden_size: int = 768
    num_layers: int = 8
    num_heads: int = 12
    num_kv_heads: int | None = None
    intermediate_size: int | None = None  # default 4 * hidden (the authors' T2C: 2048 at 768)
    unit_vocab_size: int = 1000  # raw units or unit-language tokens; specials are added on top
    max_positions: int = 4096
    rope_theta: float = 10000.0
    dropout: float = 0.0
    # generation stops at EOS, or after this many units per condition token (+16)
    max_units_per_token: int = 8
    # Decoding when no sampling is given (pseudo-labels, the engine's speech): 1 = greedy,
    # > 1 = beam search over that many hypotheses, scored by log-probability / length **
    # `length_penalty` (measured for the tiny model in docs/results.md, session 23)
    beams: int = 1
    length_penalty: float = 1.0
    trainable: bool = True
    # "echox" layout: > 0 adds what each text token *spells* to its condition vector (a small
    # byte-level encoder of the token's text, zero at init; docs/results.md, session 10). The
    # LLM's embeddings say what a token means, not how it sounds: a T2C that reads them alone
    # says a word of the same kind ("Chile" for "Brazil"). 0 = the authors' condition.
    spelling_dim: int = 0
    spelling_chars: int = 24  # bytes of a token's text that are read
    # "echox" layout: the condition goes to the decoder one *byte* of text at a time: each
    # token's vector is repeated once per byte of its text (up to `char_max`), plus that byte's
    # embedding and its place in the token. The decoder reads the text letter by letter, as
    # a TTS does, instead of one vector per token that it must learn to pronounce (ours;
    # docs/results.md, session 16). The echo decoder reads Adapter(H) the same way, so it needs
    # the segment's token ids.
    char_condition: bool = False
    char_max: int = 16
    # "echox" layout: > 0 adds a guided-attention loss (losses.guided_attention_loss) times this
    # weight, pulling each unit's attention over the condition towards the diagonal, so that the
    # T2C reads the text in order instead of skipping or swapping words (docs/results.md,
    # session 11). Training uses eager attention then (it needs the attention maps).
    align_weight: float = 0.0
    align_sigma: float = 0.2  # width of the diagonal band, in fractions of the sequence
    align_heads: int = 0  # heads guided in each layer, the first ones (0 = all)
    # "echox": our own token space (units, EOS and two prefix tokens). "authors": the released
    # checkpoints' T2C (echox.model.unit_decoder_authors): inputs in the LLM's embedding space (LLM token
    # rows + `unit_embedding` rows) go through `adapter`; it predicts LLM tokens + unit tokens
    # (`unit_vocab_size` `<|unit_...|>` tokens after the LLM vocabulary) and stops at `eos_token`
    layout: str = "echox"
    text_prefix: list[str] = field(default_factory=list)  # authors: tokens before the condition
    unit_prefix: list[str] = field(default_factory=list)  # authors: tokens after the condition
    eos_token: str = ""  # authors: the LLM tokenizer's end token that ends the units
    shared_embedding: bool = True  # authors: read the LLM's input embeddings (else own copy)
    rms_norm_eps: float = 1e-6  # authors: the LLM's value
    rope_scaling: dict[str, Any] | None = None  # authors: the LLM's (e.g. Llama-3.1's llama3 rope)
    # the unit language whose tokens the decoder predicts (`UnitLanguage.fingerprint`),
    # recorded by the training stages; None: raw units, or not recorded (older checkpoints)
    unit_language: str | None = None

    def validate(self, path: str = "t2c") -> None:
        _check(self.unit_language is None or isinstance(self.unit_language, str),
               f"{path}.unit_language", "must be a unit language's fingerprint (a string) or null")
        _check(self.layout in ("echox", "authors"), f"{path}.layout",
               f"must be 'echox' or 'authors', got {self.layout!r}")
        if self.layout == "authors":
            _check(bool(self.eos_token), f"{path}.eos_token", "the authors' layout needs its end token")
        _check(self.rope_scaling is None or isinstance(self.rope_scaling, dict),
               f"{path}.rope_scaling", "must be a mapping or null")
        _check(self.rms_norm_eps > 0, f"{path}.rms_norm_eps", "must be > 0")
        _check(0 < self.rope_theta < math.inf, f"{path}.rope_theta",
               f"must be a finite number > 0, got {self.rope_theta}")
        _check(self.align_weight >= 0, f"{path}.align_weight", "must be >= 0")
        _check(self.align_sigma > 0, f"{path}.align_sigma", "must be > 0")
        _check(self.align_heads >= 0, f"{path}.align_heads", "must be >= 0")
        _check(self.align_weight == 0 or self.layout == "echox", f"{path}.align_weight",
               "the guided-attention loss is for the 'echox' layout only")
        _check(self.hidden_size >= 1, f"{path}.hidden_size", "must be >= 1")
        _check(0.0 <= self.dropout < 1.0, f"{path}.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.num_layers >= 1, f"{path}.num_layers", f"must be >= 1, got {self.num_layers}")
        _check(self.num_heads >= 1, f"{path}.num_heads", "must be >= 1")
        _check(
            self.hidden_size % self.num_heads == 0,
            f"{path}.hidden_size",
            f"{self.hidden_size} is not divisible by num_heads={self.num_heads}",
        )
        kv = self.num_kv_heads or self.num_heads
        _check(self.num_heads % kv == 0, f"{path}.num_kv_heads", "must divide num_heads")
        _check(self.unit_vocab_size >= 2, f"{path}.unit_vocab_size", "must be >= 2")
        _check(self.max_positions >= 16, f"{path}.max_positions", "must be >= 16")
        _check(self.max_units_per_token >= 1, f"{path}.max_units_per_token", "must be >= 1")
        _check(1 <= self.beams <= MAX_BEAMS, f"{path}.beams",
               f"must be in [1, {MAX_BEAMS}], got {self.beams}")
        _check(math.isfinite(self.length_penalty), f"{path}.length_penalty",
               f"must be a finite number, got {self.length_penalty}")
        _check(self.spelling_dim >= 0, f"{path}.spelling_dim", "must be >= 0")
        _check(self.spelling_chars >= 1, f"{path}.spelling_chars", "must be >= 1")
        _check(self.spelling_dim == 0 or self.layout == "echox", f"{path}.spelling_dim",
               "only the 'echox' layout has a spelling encoder")
        _check(self.char_max >= 1, f"{path}.char_max", "must be >= 1")
        _check(not self.char_condition or self.layout == "echox", f"{path}.char_condition",
               "only the 'echox' layout reads the text by bytes")


@dataclass
class DenoiserConfig:
    """FFN that maps LLM hidden states toward the LLM's input-embedding space."""

    ff_size: int = 2048
    dropout: float = 0.1
    trainable: bool = True

    def validate(self, path: str = "denoiser") -> None:
        _check(self.ff_size >= 1, f"{path}.ff_size", "must be >= 1")
        _check(0.0 <= self.dropout < 1.0, f"{path}.dropout", "must be in [0, 1)")


@dataclass
class LossConfig:
    ctc_weight: float = 0.3
    den_lambda: float = 1.0
    # Authors' code caps the cosine term at this fraction of L_echo; None = fixed lambda.
    den_cap: float | None = 0.2
    # L_den over a segment's tokens: "sum" (the paper's Σ_i and the authors' code; averaged
    # over segments) or "mean" (averaged over tokens; EchoX-Tiny v1-v5 trained with it). Where
    # the cap binds, both give the same gradient: 0.2·L_echo·∇L_den/L_den does not change when
    # L_den is divided by another constant (docs/training.md, "Stage III")
    den_reduction: str = "sum"
    s2t_weight: float = 1.0

    def validate(self, path: str = "loss") -> None:
        _check(self.ctc_weight >= 0, f"{path}.ctc_weight", "must be >= 0")
        _check(self.den_lambda >= 0, f"{path}.den_lambda", "must be >= 0")
        _check(self.den_cap is None or self.den_cap > 0, f"{path}.den_cap", "must be > 0 or null")
        _check(self.den_reduction in ("sum", "mean"), f"{path}.den_reduction",
               f"must be 'sum' or 'mean', got {self.den_reduction!r}")
        _check(self.s2t_weight >= 0, f"{path}.s2t_weight", "must be >= 0")


@dataclass
class TriggerConfig:
    """Streaming segment trigger (authors' rule): s_t = cos(h_t, W_lm[token]), judged `delay`
    tokens late; cut at a local maximum over ±`window` when the segment reaches `max_len`
    tokens, or `min_len` tokens with s > `threshold`."""

    token: str = "."
    delay: int = 5
    window: int = 5
    max_len: int = 50
    min_len: int = 20
    threshold: float = 0.1

    def validate(self, path: str = "trigger") -> None:
        _check(bool(self.token), f"{path}.token", "must be a non-empty string")
        _check(self.delay >= 0, f"{path}.delay", "must be >= 0")
        _check(0 <= self.window <= self.delay, f"{path}.window",
               f"must be in [0, delay={self.delay}] so that the window is known when judged")
        _check(self.min_len >= 1, f"{path}.min_len", "must be >= 1")
        _check(self.max_len >= self.min_len, f"{path}.max_len", "must be >= min_len")
        _check(-1.0 <= self.threshold <= 1.0, f"{path}.threshold", "must be in [-1, 1]")


@dataclass
class EchoXConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    adapter: SpeechAdapterConfig = field(default_factory=SpeechAdapterConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    t2c: T2CConfig = field(default_factory=T2CConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "validate"):
                v.validate(f.name)
        _check(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EchoXConfig":
        return _from_dict(cls, data, "")

    def to_yaml(self, path: str | Path) -> None:
        try:
            Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        except OSError as e:  # a folder, a missing parent: pathlib's traceback
            raise ConfigError(f"cannot write the config to {path}: {e.strerror or e}") from e

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> "EchoXConfig":
        data = read_yaml_mapping(path)
        preset = data.pop("preset", None)
        base = preset_config(preset).to_dict() if preset else {}
        merged = _deep_merge(base, data)
        return apply_overrides(cls.from_dict(merged), overrides or [])

    @classmethod
    def from_json_file(cls, path: str | Path) -> "EchoXConfig":
        return cls.from_dict(read_json_object(path, ConfigError, "config file"))


MAX_THREADS = 1024  # `--threads`: more is a typo (10**8 threads crashed torch)


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse `type` for a whole number >= `minimum` (and <= `maximum`, e.g. `--threads`):
    a bad value is refused while the options are parsed, before any slow work, with argparse's
    exit status 2."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping; clear ConfigErrors otherwise."""
    p = Path(path)
    if not p.is_file():
        # the repository's recipes name their files from its root, not from the recipe
        where = "" if p.is_absolute() else f" (a relative path is read from the current folder, {Path.cwd()})"
        raise ConfigError(f"{what} not found: {p}{where}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}), so not a YAML {what}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML{_yaml_problem(e)}") from e
    except RecursionError as e:
        raise ConfigError(f"{p}: nested too deeply to be a {what}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    """Where and what of a YAML error, on one line (PyYAML's own message spans several)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{where} ({problem})"


def _is_section(parts: list[str]) -> bool:
    """Whether the dotted path names a config section (a dataclass, merged into), not a
    mapping value such as `rope_scaling` (replaced whole)."""
    cls: Any = EchoXConfig
    for p in parts:
        if not dataclasses.is_dataclass(cls):
            return False
        cls = get_type_hints(cls).get(p)
    return dataclasses.is_dataclass(cls)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _from_dict(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types by path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{path or 'config'}: unknown key(s) {unknown}; valid keys are {sorted(names)}"
        )
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        sub = f"{path}.{f.name}" if path else f.name
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], sub)
    if path:  # nested dataclasses validate with the top-level call
        return cls(**kwargs)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(str(e)) from e


# a number in exponent form without a dot (2e-4, 1E5): a string to PyYAML, a float to users
_EXP_FLOAT = re.compile(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+")


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, path)
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Union or origin is types.UnionType:  # Optional[X] and X | None
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 2e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        nxt = target.get(p)
        target[p] = nxt = dict(nxt) if isinstance(nxt, dict) else {}
        target = nxt
    target[last] = value


def load_recipe(path: str | Path | None, sections: dict[str, type | None], *,
                defaults: dict[str, Any] | None = None, override: str | Path | None = None,
                sets: list[str] | tuple[str, ...] = (),
                set_as_overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """A recipe YAML read into typed sections: the one loader of every training command.

    `sections` maps each top-level key to a dataclass (a mapping section: values are checked
    and coerced to the field types, unknown keys are errors that list the valid ones) or to
    None (a plain value, replaced whole). Layers, later ones winning: `defaults`, the file at
    `path`, the `override` file (mapping sections merged key by key), then the
    ``section.key=value`` strings of `sets` (values parsed as YAML; dotted keys reach into
    nested mappings). `set_as_overrides` sends one section's sets to a list section as
    ``key=value`` strings instead (the model's dotted overrides: ``{"model": "overrides"}``).
    Returns {section: dataclass instance or value}.
    """
    raw: dict[str, Any] = {k: ({} if cls is not None else None) for k, cls in sections.items()}
    for k, v in (defaults or {}).items():
        raw[k] = dict(v) if isinstance(v, dict) else v
    for what, file in (("recipe", path), ("override", override)):
        if not file:
            continue
        loaded = read_yaml_mapping(file, what)
        unknown = sorted(set(loaded) - set(sections))
        if unknown:
            raise ConfigError(f"{file}: unknown {what} key(s) {unknown}; valid keys are {sorted(sections)}")
        for key, val in loaded.items():
            if sections[key] is not None:
                if not isinstance(val or {}, dict):
                    raise ConfigError(f"{file}: {key} must be a mapping, got {type(val).__name__}")
                raw[key] = {**raw[key], **(val or {})}
            else:
                raw[key] = val
    for s in sets:
        key, eq, val = s.partition("=")
        section, dot, rest = key.partition(".")
        if not eq or not dot or not rest:
            raise ConfigError(f"--set {s!r}: expected section.key=value")
        if set_as_overrides and section in set_as_overrides:
            target = set_as_overrides[section]
            given = raw.get(target) or []
            if not isinstance(given, list) or not all(isinstance(o, str) for o in given):
                raise ConfigError(f"{target} must be a list of key.path=value strings, got {given!r}")
            raw[target] = [*given, f"{rest}={val}"]
        elif sections.get(section) is not None:
            try:
                parsed = yaml.safe_load(val)
            except yaml.YAMLError as e:
                raise ConfigError(f"--set {s!r}: the value is not valid YAML{_yaml_problem(e)}") from e
            _set_dotted(raw[section], rest, parsed)
        else:
            typed = sorted(k for k, c in sections.items() if c is not None)
            raise ConfigError(f"--set {s!r}: the section must be one of "
                              f"{sorted(typed + list(set_as_overrides or {}))}")
    out: dict[str, Any] = {}
    for key, cls in sections.items():
        if cls is None:
            out[key] = raw[key]
            continue
        try:
            out[key] = _from_dict(cls, raw[key], key)
        except TypeError as e:  # a required field left out
            raise ConfigError(f"{key}: {e}") from e
    return out


def apply_overrides(cfg: EchoXConfig, overrides: list[str]) -> EchoXConfig:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) and re-validate. A mapping given
    for a section (``llm.lora={r: 8}``) is merged into it, as a YAML file's section is: the
    keys it leaves out keep their values (they fell back to the class defaults, not the
    preset's)."""
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, (list, tuple)):
        raise ConfigError(f"overrides must be a list of 'key.path=value' strings, got "
                          f"{type(overrides).__name__} {overrides!r:.60}")
    data = cfg.to_dict()
    for ov in overrides:
        if not isinstance(ov, str):
            raise ConfigError(f"override {ov!r}: expected a 'key.path=value' string")
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected the form key.path=value")
        key, raw = ov.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict) or p not in node:
                raise ConfigError(f"override {ov!r}: unknown key {'.'.join(parts[: i + 1])!r}")
            node = node[p]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"override {ov!r}: unknown key {key!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {ov!r}: value is not valid YAML{_yaml_problem(e)}") from e
        was = node[parts[-1]]
        section = isinstance(was, dict) and isinstance(value, dict) and _is_section(parts)
        node[parts[-1]] = _deep_merge(was, value) if section else value
    return EchoXConfig.from_dict(data)


# ---- presets ------------------------------------------------------------------------------


def _tiny_random() -> EchoXConfig:
    """2-layer random models built on the fly (tests, CI)."""
    return EchoXConfig(
        encoder=EncoderConfig(name_or_path="builtin:tiny-random-whisper"),
        adapter=SpeechAdapterConfig(num_heads=4, lookback_dropout=0.0),
        llm=LLMConfig(
            name_or_path="builtin:tiny-random-llama",
            lora=LoraConfig(r=4, alpha=8, dropout=0.0),
        ),
        t2c=T2CConfig(
            hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
            unit_vocab_size=50, max_positions=512,
        ),
        denoiser=DenoiserConfig(ff_size=64, dropout=0.0),
    )


def _tiny() -> EchoXConfig:
    """The embedded CPU model: SmolLM2-135M-Instruct + Whisper tiny.en (offline packages)."""
    return EchoXConfig(
        encoder=EncoderConfig(name_or_path="openai/whisper-tiny.en", window_seconds=10.0),
        adapter=SpeechAdapterConfig(num_heads=9, ctc_head="tied"),
        llm=LLMConfig(
            name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
            lora=LoraConfig(r=16, alpha=32, dropout=0.05),
        ),
        t2c=T2CConfig(
            hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
            unit_vocab_size=1000, max_positions=2048,
        ),
        denoiser=DenoiserConfig(ff_size=1024),
    )


def _3b() -> EchoXConfig:
    return EchoXConfig(
        encoder=EncoderConfig(name_or_path="openai/whisper-large-v3"),
        adapter=SpeechAdapterConfig(num_heads=8),
        llm=LLMConfig(name_or_path="meta-llama/Llama-3.2-3B-Instruct", dtype="bfloat16"),
        t2c=T2CConfig(hidden_size=768, num_layers=8, num_heads=12, intermediate_size=2048),  # authors'
        denoiser=DenoiserConfig(ff_size=8192),
    )


def _8b() -> EchoXConfig:
    return EchoXConfig(
        encoder=EncoderConfig(name_or_path="openai/whisper-large-v3"),
        adapter=SpeechAdapterConfig(num_heads=8),
        llm=LLMConfig(name_or_path="meta-llama/Llama-3.1-8B-Instruct", dtype="bfloat16"),
        t2c=T2CConfig(hidden_size=768, num_layers=8, num_heads=12, intermediate_size=2048),  # authors'
        denoiser=DenoiserConfig(ff_size=14336),
    )


PRESETS: dict[str, Callable[[], EchoXConfig]] = {
    "tiny-random": _tiny_random,
    "tiny": _tiny,
    "3b": _3b,
    "8b": _8b,
}


def preset_config(name: str, overrides: list[str] | None = None) -> EchoXConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return apply_overrides(PRESETS[name](), overrides or [])


def load_config(spec: str | os.PathLike, overrides: list[str] | None = None) -> EchoXConfig:
    """A preset name or a YAML path, plus dotted overrides."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise ConfigError(f"a config is a preset name or a YAML path, got {type(spec).__name__}")
    if spec in PRESETS:
        return preset_config(spec, overrides)
    if not spec.endswith((".yaml", ".yml")) and not Path(spec).exists():
        raise ConfigError(f"unknown preset {spec!r}; choose one of {sorted(PRESETS)} or a YAML file")
    return EchoXConfig.from_yaml(spec, overrides)
