"""The three EchoX stages as configuration: what trains, what data, which task.

    s2t   speech question -> response text;  CE + 0.3·CTC;       adapter + LoRA
    t2c   text -> units;                     CE on units;        T2C
    echo  S2T hidden states -> units;        L_echo + λ·L_den + L_S2T;
          adapter + LoRA + echo decoder + denoising adapter, T2C frozen (pseudo-labels)

`--target gold-units` trains the same speech decoder on gold units of the response's TTS
audio: the baseline the paper argues against.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from echox.config import EchoXConfig, T2CConfig, apply_overrides
from echox.errors import CheckpointError, ConfigError, StageError
from echox.fileio import folder_config, json_objects, open_to_append, save_tensors
from echox.model.batch import S2TBatch, T2CBatch, collate_t2c
from echox.model.checkpoint import load_weights, local_or_hub, option_folder, verify_checkpoint
from echox.model.echox import EchoX
from echox.model.prompt import Turn

log = logging.getLogger(__name__)

PARTS = ("encoder", "adapter", "llm", "t2c", "echo", "denoiser")
STAGE_PARTS: dict[str, set[str]] = {
    "s2t": {"adapter", "llm"},
    "t2c": {"t2c"},
    "echo": {"adapter", "llm", "echo", "denoiser"},
}


# Stage III with `train.freeze_s2t`: the S2T model (adapter + LoRA) stays as Stage I left it
FROZEN_S2T_ECHO_PARTS = {"echo", "denoiser"}


def apply_stage(model: EchoX, stage: str, freeze_s2t: bool = False) -> None:
    """Make the parts `stage` trains trainable, the rest frozen. A part the model was loaded
    without (a slim `--init`'s `omitted_parts`) is trained here, so its checkpoints keep it:
    left on the list, saves dropped it (a T2C run from a Stage I export ended with no T2C)
    or refused to (an echo run from one)."""
    parts = FROZEN_S2T_ECHO_PARTS if stage == "echo" and freeze_s2t else STAGE_PARTS[stage]
    model.set_trainable({p: p in parts for p in PARTS})
    stored = set(parts) | ({"echo", "t2c"} if model.t2c is model.echo and parts & {"echo", "t2c"}
                           else set())
    model.omitted_parts = tuple(p for p in model.omitted_parts if p not in stored)


def prepare_model(
    stage: str,
    config: EchoXConfig | None = None,
    init: str | Path | None = None,
    t2c_from: str | Path | None = None,
    init_overrides: list[str] | None = None,
    freeze_s2t: bool = False,
) -> EchoX:
    """The model a stage starts from, with its prerequisites checked.

    s2t / t2c: fresh from `config`, or continue from `init`. `init_overrides` change the
    adapter, the loss weights, the LoRA dropout or the unit decoding of an `init` model
    (`adapter.key=value`, `loss.key=value`, `llm.lora.dropout=p`, `t2c.beams=n`,
    `t2c.length_penalty=a` only: e.g. `adapter.shrink=false`), keeping the trained weights
    that still fit (`EchoX.reconfigure_adapter`).
    echo: `init` must hold a Stage-I (s2t) model; the trained T2C comes from `t2c_from`
    (a Stage-II output) or from `init` itself when it already has one.
    """
    base: dict[str, str] = {}
    recorded_llm = None  # the LLM the --init checkpoint names, before any relocation
    if init is not None:
        init = option_folder("--init", init)
        # the frozen base models may be read from elsewhere (a moved folder, a cluster's
        # local copy of a hub id): `llm.name_or_path=` / `encoder.name_or_path=`
        rest = []
        for o in init_overrides or []:
            key, _, value = o.partition("=")
            part = key.strip().removesuffix(".name_or_path")
            if key.strip() in ("llm.name_or_path", "encoder.name_or_path") and value.strip():
                base[part] = local_or_hub(value.strip())
            else:
                rest.append(o)
        if "llm" in base:
            recorded_llm = (((folder_config(init) or {}).get("config") or {}).get("llm")
                            or {}).get("name_or_path")
        model = EchoX.from_pretrained(init, base_models=base or None)
        if rest:
            _reconfigure(model, rest)
    elif stage == "echo":
        raise StageError(
            "stage echo needs --init <Stage I (s2t) checkpoint> and --t2c-from <Stage II (t2c) "
            "checkpoint>: echo training starts from a trained S2T model and a trained T2C"
        )
    else:
        if config is None:
            raise StageError("give a model config (preset or YAML) or --init")
        model = EchoX.build(config)
    if stage == "echo":
        if "s2t" not in model.trained_stages:
            raise StageError(
                f"--init {init} was not trained with stage s2t (it records "
                f"{model.trained_stages or 'no stages'}); run `echox train s2t` first"
            )
        if t2c_from is not None:
            _load_t2c(model, option_folder("--t2c-from", t2c_from), init_llm=recorded_llm)
        elif "t2c" not in model.trained_stages:
            raise StageError(
                "stage echo needs a trained T2C: pass --t2c-from <Stage II checkpoint>"
            )
        if "echo" not in model.trained_stages:
            model.init_echo_from_t2c()
    apply_stage(model, stage, freeze_s2t)
    return model


def _reconfigure(model: EchoX, overrides: list[str]) -> None:
    try:  # every key checked first: a typo is an error, not a setting "ignored"
        apply_overrides(model.config, overrides)
    except ConfigError as e:
        raise StageError(str(e)) from e
    ignored = [o for o in overrides
               if not o.strip().startswith(("adapter.", "loss.", "llm.lora.dropout=", "t2c.beams=",
                                            "t2c.length_penalty="))]
    if ignored:
        log.warning("--init: the model config comes from the checkpoint; only adapter, loss, "
                    "llm.lora.dropout, the unit decoding (t2c.beams, t2c.length_penalty) and "
                    "where the base models are read (llm.name_or_path, encoder.name_or_path) "
                    "may change, so these are ignored: %s", ", ".join(ignored))
    overrides = [o for o in overrides if o not in ignored]
    if not overrides:
        return
    try:
        cfg = apply_overrides(model.config, overrides)
    except ConfigError as e:
        raise StageError(str(e)) from e
    model.config.loss = cfg.loss  # weights only: nothing to rebuild
    # decoding only (the pseudo-labels'); the decoders read this config object
    model.config.t2c.beams, model.config.t2c.length_penalty = cfg.t2c.beams, cfg.t2c.length_penalty
    if cfg.llm.lora.dropout != model.config.llm.lora.dropout:
        n = model.llm.set_lora_dropout(cfg.llm.lora.dropout)
        model.config.llm.lora.dropout = cfg.llm.lora.dropout
        log.info("LoRA dropout set to %s on %d layers", cfg.llm.lora.dropout, n)
    if cfg.adapter == model.config.adapter:
        return
    changed = model.reconfigure_adapter(cfg.adapter)
    log.info("adapter reconfigured (%s): fresh %s, dropped %s", ", ".join(overrides),
             changed["new"] or "none", changed["dropped"] or "none")


def _load_t2c(model: EchoX, folder: Path, init_llm: str | None = None) -> None:
    """Take the trained T2C of a Stage II checkpoint, checking it fits."""
    from dataclasses import asdict

    try:
        meta = verify_checkpoint(folder)
    except CheckpointError as e:
        raise StageError(f"--t2c-from: {e}") from e
    if "t2c" not in meta.get("trained_stages", []):
        raise StageError(f"--t2c-from {folder} was not trained with stage t2c; run `echox train t2c`")
    theirs, ours = meta["config"]["t2c"], asdict(model.config.t2c)
    diff = [k for k in ("hidden_size", "num_layers", "num_heads", "unit_vocab_size") if theirs.get(k) != ours[k]]
    # a model whose echo decoder no stage trained takes the T2C's shape as it is (a Stage I
    # model of a unit-language recipe, and a T2C over the raw units); a trained one must fit
    if diff and ("echo" in model.trained_stages
                 or {ours["layout"], theirs.get("layout", "echox")} != {"echox"}):
        raise StageError(f"--t2c-from {folder}: its T2C differs from the model's in {diff}")
    own = {"spelling_dim": 0, "spelling_chars": 24, "align_weight": 0.0, "align_sigma": 0.2,
           "align_heads": 0, "char_condition": False, "char_max": 16}
    if diff or any(theirs.get(k, v) != ours[k] for k, v in own.items()):
        # a spelling encoder only adds to the T2C's condition, and the guided-attention loss
        # only to its training loss: take the Stage II config (the echo decoder is its copy)
        # (the decoding stays the model's own: `--set model.t2c.beams` beside --init)
        decoding = ("beams", "length_penalty")
        model.use_t2c_config(T2CConfig(**{**ours, **{k: v for k, v in theirs.items()
                                                     if k in ours and k not in decoding}}))
    # the unit language its targets were in (its fingerprint), whichever config is kept
    model.config.t2c.unit_language = theirs.get("unit_language")
    # (an LLM read from elsewhere with --set: the T2C must name the one --init names)
    if meta["config"]["llm"]["name_or_path"] not in (model.config.llm.name_or_path, init_llm):
        raise StageError(f"--t2c-from {folder}: trained on LLM embeddings of "
                         f"{meta['config']['llm']['name_or_path']}, not {model.config.llm.name_or_path}")
    load_weights(model, folder, parts=["t2c"], omitted=())  # a T2C left out is an error
    if "t2c" not in model.trained_stages:  # each resume of an echo run from --init appended it again
        model.trained_stages.append("t2c")
    model.omitted_parts = tuple(p for p in model.omitted_parts if p != "t2c")  # it is here now


# ---- datasets and collators ---------------------------------------------------------------


class ListDataset(Dataset):
    """Wraps a list of examples, or a callable-backed sequence (lazy audio loading)."""

    def __init__(self, items: Sequence[Any], load: Callable[[Any], Any] | None = None) -> None:
        self.items, self.load = items, load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.load(self.items[i]) if self.load else self.items[i]


@dataclass
class EchoExample:
    turns: list[Turn]
    segments: list[list[tuple[int, int]]] | None = None  # per response
    units: list[list[int]] | None = None  # per segment (offline pseudo-labels or gold units)
    states: list[torch.Tensor] | None = None  # per response: a frozen S2T model's H, precomputed


def s2t_collator(model: EchoX) -> Callable[[list[list[Turn]]], S2TBatch]:
    return lambda dialogues: model.collate(dialogues)


def echo_collator(model: EchoX) -> Callable[[list[EchoExample]], S2TBatch]:
    def collate(examples: list[EchoExample]) -> S2TBatch:
        batch = model.collate([e.turns for e in examples])
        if all(e.units is not None for e in examples):
            batch.units = [u for e in examples for u in e.units]  # type: ignore[union-attr]
        if all(e.segments is not None for e in examples):
            batch.segments = [s for e in examples for s in e.segments]  # type: ignore[union-attr]
        if all(e.states is not None for e in examples):
            batch.states = [h for e in examples for h in e.states]  # type: ignore[union-attr]
        return batch

    return collate


def t2c_collator(model: EchoX, encode_units: Callable[[list[int]], list[int]] | None = None
                 ) -> Callable[[list[tuple[str, list[int]]]], T2CBatch]:
    """Examples are (text, units); units go through the unit language when given."""
    def collate(examples: list[tuple[str, list[int]]]) -> T2CBatch:
        ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t, _ in examples]
        units = [encode_units(u) if encode_units else list(u) for _, u in examples]
        return collate_t2c(ids, units)

    return collate


@torch.no_grad()
def precompute_pseudo_labels(
    model: EchoX, dialogues: Sequence[list[Turn]], cache: Path, cut: bool, batch_size: int = 16,
    states: Sequence[list[torch.Tensor]] | None = None,
) -> list[EchoExample]:
    """Offline mode: segments (trigger cuts on the S2T model's teacher-forced states) and the
    frozen T2C's units for each segment, cached in a JSONL keyed by the dialogue's text, the
    decoding, the T2C's weights (`t2c_fingerprint`) and, when `cut`, the S2T model's weights
    (the cuts come from its states): a run folder reused with another T2C or Stage I model
    decodes its labels anew instead of reading the old ones.
    `states`: the dialogues' precomputed response states (a frozen S2T model), so the S2T model
    is not run again. The T2C decodes the segments of `batch_size` dialogues at once."""
    done = {rec["key"]: rec for _, rec in json_objects(cache, "key", log)}
    t2c = model.config.t2c
    decoding = f"|beams={t2c.beams},length_penalty={t2c.length_penalty}" if t2c.beams > 1 else ""
    decoding += f"|t2c={t2c_fingerprint(model)}" + (f"|s2t={s2t_fingerprint(model)}" if cut else "")
    keys = [_dialogue_key(d) + decoding for d in dialogues]
    todo = [i for i, k in enumerate(keys) if k not in done]
    if done:
        log.info("%s: %d of %d dialogues' labels cached for these models, %d to decode",
                 cache, len(keys) - len(todo), len(keys), len(todo))
    was = model.training
    model.eval()
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open_to_append(cache) as f:  # a line torn by a kill is ended first
        for s in range(0, len(todo), batch_size):
            idx = todo[s:s + batch_size]
            batch = model.collate([dialogues[i] for i in idx])
            if states is not None:
                batch.states = [h for i in idx for h in states[i]]
                responses = model.cached_response_states(batch)
            else:
                responses = model.response_states(model.forward_s2t(batch), batch)
            r, segs_of, texts = 0, [], []
            for spans in batch.response_spans:
                segs_all = []
                for _ in spans:
                    h, x = responses[r]
                    r += 1
                    segs = model.trigger_segments(h) if cut else [(0, len(x))]
                    segs_all.append([list(sg) for sg in segs])
                    texts.extend(x[a:b] for a, b in segs)
                segs_of.append(segs_all)
            units = model.pseudo_labels(texts) if texts else []
            u = 0
            for i, segs_all in zip(idx, segs_of):
                n = sum(len(sg) for sg in segs_all)
                rec = {"key": keys[i], "segments": segs_all, "units": units[u:u + n]}
                u += n
                done[keys[i]] = rec
                f.write(json.dumps(rec) + "\n")
            f.flush()
    model.train(was)
    return [
        EchoExample(d, [[tuple(sg) for sg in segs] for segs in done[k]["segments"]], done[k]["units"])
        for d, k in zip(dialogues, keys)
    ]


def _weights_digest(model: EchoX, config_keys: tuple[str, ...],
                    named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha1 of the config sections `config_keys` and the named tensors, 16 hex digits."""
    cfg = model.config.to_dict()
    h = hashlib.sha1(json.dumps({k: cfg.get(k) for k in config_keys}, sort_keys=True,
                                default=str).encode())
    for n, t in named:
        h.update(n.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def s2t_fingerprint(model: EchoX) -> str:
    """A digest of what makes the S2T model's response states: its config, the adapter's
    weights and the LLM's trainable (LoRA) weights."""
    named = list(model.adapter.state_dict().items())
    named += [(n, p) for n, p in model.llm.named_parameters() if "lora_" in n]
    return _weights_digest(model, ("encoder", "adapter", "llm"), named)


def t2c_fingerprint(model: EchoX) -> str:
    """A digest of what makes the frozen T2C's pseudo-labels: its config, the LLM it reads the
    response's embeddings from and the T2C's weights."""
    return _weights_digest(model, ("t2c", "llm"), model.t2c.state_dict().items())


@torch.no_grad()
def precompute_states(model: EchoX, dialogues: Sequence[list[Turn]], cache: Path,
                      batch_size: int = 8) -> list[list[torch.Tensor]]:
    """A frozen S2T model's teacher-forced response states H (float16), per dialogue and
    response, computed once: one safetensors file per dialogue under `cache/<fingerprint>/`
    (the fingerprint of the S2T weights, so another model never reads them), written
    atomically. A corrupt file is recomputed, with a warning."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = cache / s2t_fingerprint(model)
    folder.mkdir(parents=True, exist_ok=True)
    keys = [_dialogue_key(d) for d in dialogues]
    out: list[list[torch.Tensor] | None] = [None] * len(dialogues)
    for i, k in enumerate(keys):
        f = folder / f"{k}.safetensors"
        if f.is_file():
            try:
                t = load_file(str(f))
                out[i] = [t[f"r{j}"] for j in range(len(t))]
            except (SafetensorError, OSError, KeyError, ValueError) as e:
                log.warning("%s: unreadable cached states (%s); recomputing", f, e)
    todo = [i for i, h in enumerate(out) if h is None]
    was = model.training
    model.eval()
    try:
        for s in range(0, len(todo), batch_size):
            idx = todo[s:s + batch_size]
            batch = model.collate([dialogues[i] for i in idx])
            responses = model.response_states(model.forward_s2t(batch), batch)
            r = 0
            for i, spans in zip(idx, batch.response_spans):
                hs = [responses[r + j][0].to(torch.float16).cpu().contiguous() for j in range(len(spans))]
                r += len(spans)
                f = folder / f"{keys[i]}.safetensors"
                tmp = f.with_suffix(".tmp")
                save_tensors({f"r{j}": h for j, h in enumerate(hs)}, tmp)
                tmp.replace(f)
                out[i] = hs
    finally:
        model.train(was)
    if todo:
        log.info("response states: %d computed, %d cached (%s)", len(todo), len(keys) - len(todo), folder)
    return out  # type: ignore[return-value]


def _dialogue_key(turns: list[Turn]) -> str:
    """The dialogue's texts and all of its audio (two recordings of one question with the same
    opening, e.g. its leading silence, shared a key when only the first 4 KB were read)."""
    h = hashlib.sha1()
    for t in turns:
        h.update(f"{t.role}\x00{t.text or ''}\x00{t.transcript or ''}\x00".encode())
        if t.audio is not None:
            a = np.ascontiguousarray(t.audio)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(memoryview(a).cast("B"))
    return h.hexdigest()


