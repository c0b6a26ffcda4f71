"""`echox train s2t | t2c | echo`: wire a recipe (model + train config + data) to the trainer.

A recipe is a YAML file::

    model: tiny                  # preset name or model YAML
    overrides: [llm.lora.r=16]   # dotted model overrides
    train: {max_steps: 200, batch_size: 4, lr: 1e-4, ...}     # TrainConfig fields
    data:  {train: data/tiny/train/dialogues.jsonl, eval: ..., eval_limit: 32,
            unit_language: runs/units/language}

Command-line options override the recipe; `--set train.lr=3e-4` / `--set model.t2c.num_layers=2`
set any field. `--override FILE` applies a second recipe-shaped file over the first (e.g. the
CPU dry run of a GPU recipe: tiny sizes and local data, docs/scale.md). Data sources may also be
EchoX-Dialogues shard folders and Hugging Face datasets (docs/training.md, "Data layout").
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import logging
import os
import signal
import socket
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset

from echox.config import MAX_THREADS, int_at_least, load_config, load_recipe
from echox.data.datasets import (
    ConcatDataset,
    S2TDataset,
    T2CDataset,
    collate_t2c_examples,
    make_s2t_collator,
)
from echox.data.hf import load_hf_asr, load_hf_dialogues
from echox.data.manifest import (
    DialogueMessage,
    DialogueRecord,
    read_dialogues_json,
    read_jsonl,
    resolve_audio,
    write_jsonl,
)
from echox.data.s2t_mix import ASR_PROMPT
from echox.errors import ConfigError, ManifestError
from echox.fileio import atomic_write_text, check_out_path, folder_config, read_json_object
from echox.hub import cache_dir
from echox.signals import handled
from echox.train import stages
from echox.train.trainer import (
    TrainConfig,
    Trainer,
    TrainResult,
    check_enough_examples,
    check_no_checkpoints,
    check_run_folder,
    encoder_cache_root,
    find_latest_checkpoint,
)
from echox.units.language import UnitLanguage

log = logging.getLogger(__name__)


@dataclass
class StageData:
    """The `data` section of a stage recipe."""

    # a manifest, a source mapping (see `_dialogue_source`) or a list of them (s2t, echo)
    train: Any = None
    eval: Any = None
    limit: int | None = None  # read only this many training examples
    eval_limit: int | None = 32
    unit_language: str | None = None  # a unit-language folder: T2C/echo targets in its tokens
    perturb: list[list[float]] | None = None  # [[speed, gain], ...] copies of each S2T clip

    def __post_init__(self) -> None:
        for key in ("limit", "eval_limit"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"data.{key} must be >= 1 (or unset), got {value}")
        for pair in self.perturb or []:
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                    or not all(isinstance(v, (int, float)) and v > 0 for v in pair)):
                raise ConfigError(f"data.perturb: each copy is [speed, gain], two numbers > 0; "
                                  f"got {pair!r}")


STAGE_SECTIONS: dict[str, type | None] = {"model": None, "overrides": None, "train": TrainConfig,
                                          "data": StageData}


def load_stage_recipe(path: str | None, sets: list[str], override: str | None = None,
                      stage: str = "s2t", recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """A stage recipe (see the module docstring) through `echox.config.load_recipe`:
    {"model": name or YAML, "overrides": [...], "train": TrainConfig, "data": StageData}.
    `recorded` (a run's recipe.json) replaces the defaults under the file, the override and
    the sets."""
    defaults = ({k: recorded[k] for k in STAGE_SECTIONS if k in recorded} if recorded is not None else
                {"model": "tiny", "overrides": [], "train": {"stage": stage, "output_dir": f"runs/{stage}"}})
    recipe = load_recipe(path, STAGE_SECTIONS, override=override, sets=sets, defaults=defaults,
                         set_as_overrides={"model": "overrides"})
    ovs = recipe["overrides"]
    if ovs is not None and (not isinstance(ovs, list) or not all(isinstance(o, str) for o in ovs)):
        raise ConfigError(f"overrides must be a list of key.path=value strings, got {ovs!r}")
    return recipe


def train_config(stage: str, recipe: dict[str, Any], args: argparse.Namespace) -> TrainConfig:
    """The recipe's TrainConfig with the command line's options over it."""
    given = {name: getattr(args, name) for name in
             ("output_dir", "max_steps", "batch_size", "lr", "target", "pseudo_labels", "threads")
             if getattr(args, name, None) is not None}
    return replace(recipe["train"], stage=stage, **given)


class EchoDataset(Dataset):
    """S2T dialogues as echo examples: gold units, precomputed pseudo-labels, or none (online)."""

    def __init__(self, base: Dataset, extras: list[tuple[list, list]] | None, gold: bool,
                 encode: Callable[[list[int]], list[int]] | None = None,
                 states: list[list[Any]] | None = None) -> None:
        self.base, self.extras, self.gold, self.encode = base, extras, gold, encode
        self.states = states  # a frozen S2T model's response states per dialogue (freeze_s2t)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def length(self, i: int) -> int:
        return self.base.length(i)  # type: ignore[attr-defined]

    def __getitem__(self, i: int) -> stages.EchoExample:
        out = self._example(i)
        if self.states is not None:
            out.states = self.states[i]
        return out

    def _example(self, i: int) -> stages.EchoExample:
        ex = self.base[i]
        if self.gold:
            if ex.units is None:
                raise ConfigError(f"dialogue {ex.id or i}: --target gold-units needs units on "
                                  "every assistant turn (give them units with `echox units attach`)")
            units = [self.encode(u) for u in ex.units] if self.encode else ex.units
            return stages.EchoExample(ex.turns, units=units)
        if self.extras is not None:
            segs, units = self.extras[i]
            return stages.EchoExample(ex.turns, segs, units)
        return stages.EchoExample(ex.turns)


def _dialogues(paths: Any, limit: int | None, max_seconds: float,
               perturb: list[tuple[float, float]] | None = None,
               fits: Callable[[Any], bool] | None = None) -> Dataset:
    """One source, or several read as one (`data.train: [qa.jsonl, asr.jsonl]`); `limit`
    counts over all of them, in order. A source is a dialogues JSONL, an EchoX-Dialogues
    `data.json` / shard folder / folder of shards, or a mapping (see `_dialogue_source`).
    Dialogues that `fits` refuses are left out with a warning."""
    parts, left = [], limit
    for src in list(paths) if isinstance(paths, (list, tuple)) else [paths]:
        recs, base = _dialogue_source(src)
        recs = recs[:left] if left is not None else recs
        if fits is not None:
            kept, long = [], []
            for r in recs:  # each dialogue measured once
                (kept if fits(r) else long).append(r)
            if long:
                log.warning("%s: %d of %d dialogues are longer than the LLM's positions and are "
                            "left out (first: %s)", src, len(long), len(recs), long[0].id or "?")
            recs, left = kept, (left - len(long) if left is not None else None)
        if recs:
            parts.append(S2TDataset(recs, base, max_audio_seconds=max_seconds, perturb=perturb))
        if left is not None:
            left -= len(recs)
            if left <= 0:
                break
    if not parts:
        raise ConfigError(f"no dialogues in {paths}")
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def _fits_the_llm(model: Any) -> Callable[[Any], bool] | None:
    """Whether a dialogue's text alone fits the LLM's positions (its audio takes more): a
    runaway line (a book as one answer) would otherwise ask for memory in the square of its
    length when its batch comes. A token is at least a quarter of a character (a byte of
    UTF-8), so only texts longer than a quarter of the limit in characters are tokenized."""
    limit = getattr(getattr(model.llm.model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None

    def fits(rec: Any) -> bool:
        texts = [m.value or "" for m in rec.conversations]
        if 4 * sum(map(len, texts)) < limit:
            return True
        return sum(len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) < limit

    return fits


def _first_record_has(path: Any, key: str) -> bool:
    """Whether the first JSON line of `path` is an object with `key` (what kind of manifest
    it is, for a message)."""
    try:
        with open(path, encoding="utf-8") as f:
            line = next((x for x in f if x.strip()), "")
        first = json.loads(line)
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and key in first


def _records(ds: Dataset | None) -> list[Any]:
    """The dialogue records of an S2T dataset (one source or several read as one)."""
    if ds is None:
        return []
    if isinstance(ds, ConcatDataset):
        return [r for part in ds.parts for r in _records(part)]
    return list(getattr(ds, "records", []))


def build_data(stage: str, model: Any, cfg: TrainConfig, data: StageData
               ) -> tuple[Dataset, Dataset | None, Callable[[list[Any]], Any], dict[str, Any]]:
    """Datasets, collator and per-step model kwargs of a stage."""
    train_path, eval_path = data.train, data.eval
    if not train_path:
        raise ConfigError(f"stage {stage}: give training data (--data or data.train in the recipe)")
    for what, paths in (("--data (data.train)", train_path), ("--eval-data (data.eval)", eval_path)):
        for p in paths if isinstance(paths, (list, tuple)) else [paths]:
            if isinstance(p, (str, os.PathLike)) and p and not Path(p).exists():
                raise ConfigError(
                    f"{what} {p}: no such file; make the data first (the tiny recipe's corpus: "
                    "`echox data build-tiny`, then the steps of recipes/tiny/pipeline.sh, "
                    "docs/training.md; the 3B and 8B recipes': recipes/3b/prepare_data.sh, "
                    "docs/scale.md)")
    limit, eval_limit = data.limit, data.eval_limit
    max_s = model.config.encoder.max_seconds  # whole windows of a longer clip are encoded in turn
    lang = _unit_language(data.unit_language, model.t2c.num_units)
    if stage != "s2t":  # the decoder's targets are this language's tokens, or raw units
        _match_unit_language(model, lang, data.unit_language,
                             needed=stage == "t2c" or cfg.target == "gold-units")
    encode = lang.encode if lang is not None else None
    if stage == "t2c":

        def tts(paths: Any, lim: int | None) -> Dataset:
            """One TTS manifest or several read as one; `lim` counts over all, in order."""
            recs = []
            for p in paths if isinstance(paths, (list, tuple)) else [paths]:
                got = read_jsonl(p, "tts", on_error="skip").records
                if not got and _first_record_has(p, "conversations"):
                    raise ConfigError(f"{p}: a dialogues manifest; Stage II (t2c) trains on TTS "
                                      "manifests of text and units (`echox units extract`, "
                                      "docs/units.md)")
                recs += got
            return T2CDataset(recs[:lim] if lim else recs, model.tokenizer, encode,
                              max_positions=model.t2c.cfg.max_positions,
                              row_length=model.t2c_row_length, vocab_size=model.t2c.num_units)

        return (tts(train_path, limit), tts(eval_path, eval_limit) if eval_path else None,
                collate_t2c_examples, {})
    perturb = data.perturb
    fits = _fits_the_llm(model)
    train = _dialogues(train_path, limit, max_s, perturb=[tuple(p) for p in perturb] if perturb else None,
                       fits=fits)
    ev = _dialogues(eval_path, eval_limit, max_s, fits=fits) if eval_path else None
    if stage == "s2t":
        return (train, ev, make_s2t_collator(model.prompt, model.tokenizer, units="ignore"),
                {"ctc_only": True} if cfg.ctc_only else {})
    gold = cfg.target == "gold-units"
    if gold:  # every dialogue now, not at its first read (the eval data's: steps into the run)
        for what, ds in (("--data (data.train)", train), ("--eval-data (data.eval)", ev)):
            lacking = [r for r in _records(ds) if r.response_units is None]
            if lacking:
                raise ConfigError(
                    f"{what}: dialogue {lacking[0].id or '?'}"
                    + (f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else "")
                    + " has an assistant turn without units, and --target gold-units trains on "
                    "them; give its responses units with `echox units attach` (docs/units.md)")
            # units the decoder cannot take (another k-means') stopped the run at their batch
            k = lang.num_units if lang is not None else model.echo.num_units
            for r in _records(ds):
                bad = next((u for seq in r.response_units for u in seq if not 0 <= u < k), None)
                if bad is not None:
                    raise ConfigError(f"{what}: dialogue {r.id or '?'} has the unit {bad}, outside "
                                      f"[0, {k}) of {'the unit language' if lang is not None else 'the echo decoder'}"
                                      " (units of another k-means?)")
    offline = not gold and cfg.pseudo_labels == "offline"
    # the released layout: the T2C is the echo decoder (one module), which Stage III trains
    shared = model.echo is model.t2c
    if shared and not gold and not offline:
        raise ConfigError(
            "this model's T2C and echo decoder are one module (the released layout), and Stage "
            "III trains it: online pseudo-labels would come from the decoder being trained, not "
            "a frozen T2C; use --pseudo-labels offline (decoded once, before the first step)")
    if cfg.freeze_s2t or offline:  # before the states and labels (minutes), as the sampler will
        check_enough_examples(len(train), cfg.batch_size, int(os.environ.get("WORLD_SIZE") or 1))
    # every training dialogue, loaded once, for the steps that run the S2T model over them all
    turns = [train[i].turns for i in range(len(train))] if cfg.freeze_s2t or offline else []
    states = ev_states = None
    sizes = {"batch_size": cfg.precompute_batch} if cfg.precompute_batch else {}
    if cfg.freeze_s2t:  # the frozen S2T model runs once per dialogue, not once per step
        root = Path(cfg.output_dir) / "states"
        states = stages.precompute_states(model, turns, root, **sizes)
        if ev is not None:
            ev_states = stages.precompute_states(model, [ev[i].turns for i in range(len(ev))], root, **sizes)

    def labels(dialogues: list[Any], cached: Any) -> list[tuple[Any, Any]]:  # offline, one cache file
        return [(e.segments, e.units) for e in stages.precompute_pseudo_labels(
            model, dialogues, Path(cfg.output_dir) / "pseudo_labels.jsonl", cut=cfg.cut_segments,
            states=cached, **sizes)]

    extras = labels(turns, states) if offline else None
    ev_extras = None
    if offline and shared and ev is not None:  # the eval labels too, from the untrained decoder
        ev_extras = labels([ev[i].turns for i in range(len(ev))], ev_states)
    kwargs = {"cut": cfg.cut_segments and not gold}
    ev_ds = EchoDataset(ev, ev_extras, gold, encode, ev_states) if ev is not None else None
    return EchoDataset(train, extras, gold, encode, states), ev_ds, stages.echo_collator(model), kwargs


# Keys of a mapping in `data.train` / `data.eval` (stages s2t and echo).
SOURCE_KEYS = {"hf", "path", "schema", "split", "name", "limit", "audio_dir", "prompt",
               "audio_column", "text_column"}


def _dialogue_source(src: Any) -> tuple[list[Any], Path | None]:
    """(dialogue records, folder their relative audio paths start from) of one data source.

    - ``path/to/dialogues.jsonl``: a dialogues JSONL manifest;
    - an EchoX-Dialogues ``data.json``, an extracted shard folder holding one, or a folder of
      such shards (every ``data.json`` below it, in sorted order; audio paths made absolute);
    - a mapping ``{path: <one of the above>, limit: N}``, or a Hugging Face dataset
      ``{hf: <hub id, save_to_disk folder or parquet file/folder>, split: train, name: <config>,
      schema: dialogue | asr, limit: N, audio_dir: <folder>, prompt: ..., audio_column: ...,
      text_column: ...}``. An `asr` dataset (audio + transcript, e.g. LibriSpeech) becomes ASR
      turns: the clip with the instruction `prompt` (default "Transcribe this audio.") and its
      transcript as the answer. See `_hf_dialogues` for where the audio goes.
    """
    opts: dict[str, Any] = {}
    if isinstance(src, dict):
        unknown = set(src) - SOURCE_KEYS
        if unknown or ("hf" in src) == ("path" in src):
            raise ConfigError(f"data source {src}: give exactly one of hf or path; "
                              f"unknown key(s) {sorted(unknown)}; valid: {sorted(SOURCE_KEYS)}")
        where = src.get("hf", src.get("path"))
        if not isinstance(where, str) or not where.strip():
            raise ConfigError(f"data source {src}: its {'hf' if 'hf' in src else 'path'} must be "
                              "a non-empty string")
        lim = src.get("limit")
        if lim is not None and (type(lim) is not int or lim < 0):  # -1 dropped the last record
            raise ConfigError(f"data source {src}: limit must be a whole number >= 0, got {lim!r}")
        if "hf" in src:
            return _hf_dialogues(src), None
        opts, src = src, src["path"]
    if not isinstance(src, (str, os.PathLike)):  # a list in a list: its repr was taken as a path
        raise ConfigError(f"data source {src!r}: expected a path or a mapping with hf or path")
    p = Path(src)
    lim = opts.get("limit")
    if not (p.is_dir() or p.suffix == ".json"):  # a JSONL manifest
        rep = read_jsonl(p, "dialogue", on_error="skip")  # it names each bad line it skips
        return rep.records[:lim] if lim is not None else rep.records, rep.base_dir
    if p.is_dir() and not (p / "data.json").is_file():
        shards = sorted(p.rglob("data.json"))
        if not shards:
            raise ConfigError(f"data source {p}: no data.json below it (extract the EchoX-Dialogues "
                              "tar shards there) and not a .jsonl manifest")
    else:
        shards = [p]
    recs: list[Any] = []
    for shard in shards:
        try:
            rep = read_dialogues_json(shard, on_error="skip")
        except ManifestError as err:
            raise ConfigError(str(err)) from err
        for r in rep.records:  # several shards, one dataset: every path absolute
            for m in r.conversations:
                if isinstance(m.audio, str):
                    m.audio = str(Path(resolve_audio(m.audio, rep.base_dir)).absolute())
        recs += rep.records
        if lim is not None and len(recs) >= lim:
            return recs[:lim], None
    return recs, None


def _hf_dialogues(src: dict[str, Any]) -> list[Any]:
    """Dialogue records of a Hugging Face dataset source, made once.

    The rows' audio is written to `audio_dir` (default ``$ECHOX_CACHE/hf-audio``; one file per
    clip, named by content) and the records to ``<audio_dir>/<dataset>-<hash of src>.jsonl``.
    Later runs, and the other processes of a multi-process run, read that manifest: only the
    first run reads the dataset (several processes starting together each write the same files
    atomically, which is wasteful but safe; `--prepare-data` does it once beforehand).
    """
    import hashlib
    import itertools

    schema = src.get("schema", "dialogue")
    if schema not in ("dialogue", "asr"):
        raise ConfigError(f"data source {src}: schema must be dialogue or asr, got {schema!r}")
    audio_dir = Path(src["audio_dir"]) if src.get("audio_dir") else cache_dir() / "hf-audio"
    check_out_path(audio_dir, f"data source {src['hf']!r}: audio_dir")  # a file there: one line
    key = hashlib.sha1(json.dumps(src, sort_keys=True, default=str).encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(src["hf"]).strip("/"))[-60:]
    manifest = audio_dir / f"{slug}-{key}.jsonl"
    if manifest.is_file():
        return read_jsonl(manifest, "dialogue").records
    split, name, lim = src.get("split", "train"), src.get("name"), src.get("limit")
    made = not audio_dir.exists()  # a folder this call makes goes again if it stays empty
    try:
        audio_dir.mkdir(parents=True, exist_ok=True)
        if schema == "asr":
            rows = load_hf_asr(src["hf"], split, name=name, audio_dir=audio_dir, on_error="skip",
                               audio_column=src.get("audio_column"), text_column=src.get("text_column"))
            prompt = src.get("prompt", ASR_PROMPT)
            recs = [DialogueRecord([DialogueMessage("user", r.text, audio=r.audio, prompt=prompt),
                                    DialogueMessage("assistant", r.text)], id=f"asr-{r.id or i}")
                    for i, r in enumerate(itertools.islice(rows, lim))]
        else:
            rows = load_hf_dialogues(src["hf"], split, name=name, audio_dir=audio_dir, on_error="skip")
            recs = list(itertools.islice(rows, lim))
        if not recs:  # kept as made, it was read again after the data was mended: still empty
            raise ConfigError(f"data source {src['hf']!r} [{split}]: no usable row (each skipped "
                              "row was warned about above); nothing is cached, so a mended "
                              "dataset is read anew")
        write_jsonl(manifest, recs)
    except ManifestError as err:
        _drop_if_empty(audio_dir, made)
        raise ConfigError(str(err)) from err
    except ConfigError:
        _drop_if_empty(audio_dir, made)
        raise
    except OSError as err:  # a full disk or a folder it may not write: not one row's fault
        raise ConfigError(f"data source {src['hf']!r}: reading it into {audio_dir} failed "
                          f"({err.strerror or err}); the clips already written are kept and "
                          "reused by the next run") from err
    log.info("%s[%s]: %d dialogues -> %s", src["hf"], split, len(recs), manifest)
    return recs


RUN_LOCK = ".lock"


def lock_run_folder(out: Path) -> Any:
    """Hold `<out>/.lock` for as long as the returned file stays open: a second run on the
    same folder (two started at once, or a `--resume` while the first still runs) is refused.
    Both wrote the same checkpoints, best/ and metrics.jsonl, the later silently winning. The
    lock goes with its process, however it ends (kill -9 too). Only the first process of a
    multi-process launch takes it; None there, and where the file system has no locks."""
    import fcntl

    if int(os.environ.get("RANK", "0") or 0) != 0:
        return None
    try:
        fh = open(out / RUN_LOCK, "a+", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot open its lock file ({e.strerror or e})") from e
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        who = fh.read().strip()
        fh.close()
        raise ConfigError(f"--out {out} is in use by another run ({who or 'a running process'}); "
                          "wait for it to end (or stop it), or give another --out") from None
    except OSError:  # a file system without locks (some network mounts): run unguarded
        return fh
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
    fh.flush()
    return fh


def _drop_if_empty(folder: Path, made: bool) -> None:
    """A failed read of a hub source leaves no empty `audio_dir` it made behind."""
    if made:
        with contextlib.suppress(OSError):  # not empty (clips written): kept for the next run
            folder.rmdir()


def restrict_ctc_to_transcripts(model: Any, train: Any) -> None:
    """`train.ctc_vocab: transcripts`: the CTC softmax over the token ids of the training
    transcripts (and the blank). A model that already has a restricted CTC vocabulary (a
    checkpoint made this way) keeps its own, so a continued run sees the same columns."""
    if model.adapter.ctc_vocab:
        log.info("CTC vocabulary: the checkpoint's %d columns", model.adapter.ctc_vocab)
        return
    texts = train.transcripts() if hasattr(train, "transcripts") else []
    if not texts:
        raise ConfigError("train.ctc_vocab: transcripts, but the training data has no transcribed audio")
    ids = {i for t in texts for i in model.tokenizer(t, add_special_tokens=False)["input_ids"]}
    n = model.restrict_ctc(sorted(ids))
    log.info("CTC vocabulary: %d token ids of %d training transcripts (of %d)", n, len(texts),
             model.llm.vocab_size)


def _unit_language(language_dir: str | None, num_units: int) -> UnitLanguage | None:
    """The unit language the T2C's targets are written in (`data.unit_language`), if any."""
    if not language_dir:
        return None

    if not Path(language_dir).exists():
        raise ConfigError(f"data.unit_language {language_dir}: not found; train it first with "
                          "`echox units train-language` (docs/units.md; the tiny recipe: "
                          "STEP=units bash recipes/tiny/pipeline.sh)")
    lang = UnitLanguage.load(language_dir)
    if lang.vocab_size > num_units:  # a larger T2C vocabulary only leaves rows unused
        raise ConfigError(
            f"the unit language in {language_dir} has {lang.vocab_size} tokens but "
            f"t2c.unit_vocab_size is only {num_units}; set t2c.unit_vocab_size: {lang.vocab_size}")
    return lang


def _match_unit_language(model: Any, lang: UnitLanguage | None, language_dir: str | None,
                         needed: bool) -> None:
    """The run's unit language against the one the model's T2C was trained on (recorded in
    its config as a fingerprint), which it then records. `needed`: the stage's targets are
    units of the data (Stage II, Stage III's gold units), which without the language would be
    taken as raw unit ids."""
    cfg = model.config.t2c
    if lang is None:
        if cfg.unit_language and needed:
            raise ConfigError(
                f"the model's T2C predicts tokens of a unit language (fingerprint {cfg.unit_language}) "
                "but no data.unit_language is given, so its targets would be raw unit ids; give "
                "the language it was trained on (--set data.unit_language=DIR)")
        return
    fingerprint = lang.fingerprint
    if cfg.unit_language and cfg.unit_language != fingerprint:
        raise ConfigError(
            f"data.unit_language {language_dir} (fingerprint {fingerprint}) is not the unit "
            f"language the model's T2C was trained on (fingerprint {cfg.unit_language})")
    cfg.unit_language = fingerprint


def _data_before(was: dict[str, Any], now: dict[str, Any]) -> list[Any]:
    """A run resumed on other data than its own (`was`: its recipe.json) is said so; what it
    trained on before is returned (newest first) for `recipe.json`'s `data_before`, which
    otherwise would name only the new data."""
    before, older = was.get("data"), was.get("data_before")
    older = older if isinstance(older, list) else []
    if not isinstance(before, dict):
        return older
    then = was.get("cwd") if isinstance(was.get("cwd"), str) else os.getcwd()  # where it ran
    changed = [f"{k} {before[k]!r} -> {now[k]!r}" for k in now
               if k in before and _spelled(before[k], then) != _spelled(now[k], os.getcwd())]
    if not changed:
        return older
    log.warning("--resume with other data than this run's (%s): the run goes on from its "
                "place in the old data's batch order", "; ".join(changed))
    return [before, *older]


def _starts_before(was: dict[str, Any], now: dict[str, str | None]) -> dict[str, str | None]:
    """A resumed run's starting points (`init`, `t2c_from`) as it recorded them (`was`: its
    recipe.json): a resume takes its weights from the checkpoint, so another --init given now
    is not what the run started from (it was recorded so, and the first steps' start was
    lost). Said in a warning."""
    kept = dict(now)
    for key, option in (("init", "--init"), ("t2c_from", "--t2c-from")):
        old = was.get(key)
        if isinstance(old, str) and now.get(key) and os.path.realpath(old) != os.path.realpath(str(now[key])):
            log.warning("--resume: the run started from %s %s; %s is not used (a resume goes on "
                        "from its checkpoint) and the record keeps the first", option, old, now[key])
            kept[key] = old
    return kept


def _found_in(value: Any, cwd: str) -> str | None:
    """`value`, a path given in the folder `cwd`, joined to it when it names something there."""
    there = os.path.join(cwd, value) if isinstance(value, str) and value else None
    return there if there and os.path.exists(there) else None


def _spelled(value: Any, cwd: str) -> Any:
    """A data setting with its paths normalised: `./data/x.jsonl` and `data//x.jsonl` name
    the same file as `data/x.jsonl`, and so does `main/data/x.jsonl` from the folder above
    (`cwd`: where the setting was given). A string that names no file there (a hub id, a file
    gone since) is only normalised."""
    if isinstance(value, list):
        return [_spelled(v, cwd) for v in value]
    there = _found_in(value, cwd)
    if there:
        return os.path.realpath(there)
    return os.path.normpath(value) if isinstance(value, str) and value else value


def _stopped_line(res: TrainResult) -> str:
    """The one line of a run stopped by a signal. A stop saves the step it stopped after in
    this run's checkpoints (`Trainer.train`), so --resume goes on from there."""
    step, _ = res.last_checkpoint or (res.step, None)
    return (f"echox train: stopped by {signal.Signals(res.stopped_by).name} at step {res.step}; "
            f"the last checkpoint is step {step}: resume with --resume")


def _recorded_recipe(args: argparse.Namespace) -> dict[str, Any] | None:
    """`--resume` of an `--out` run without `--recipe`: the recipe the run recorded (its
    recipe.json), so it goes on as it was started rather than with the default model."""
    if args.resume is None or args.recipe or not args.output_dir:
        return None
    path = Path(args.output_dir) / "recipe.json"
    if not path.is_file():
        if not args.data and not any((Path(args.output_dir) / "checkpoints").glob("step-*")):
            # a mistyped --out: not "give training data", which sent the user after the data
            raise ConfigError(f"--resume: {args.output_dir} holds no run to resume (no recipe.json "
                              "and no checkpoints/step-*); check the --out path, or give --recipe "
                              "or --data to start a run there")
        return None
    recorded = read_json_object(path, ConfigError, "the run's recipe")
    if os.environ.get("RANK", "0") == "0":  # one line for a multi-process launch
        print(f"echox: --resume without --recipe: the run's own recipe ({path})", file=sys.stderr)
    then = recorded.get("cwd")

    def there(v: Any) -> Any:  # a relative path, read from where the run ran
        if isinstance(v, list):
            return [there(x) for x in v]
        p = _found_in(v, then) if isinstance(then, str) and not os.path.isabs(str(v)) else None
        return os.path.abspath(p) if p else v

    model = recorded.get("model")
    if isinstance(model, str) and model.endswith((".yaml", ".yml")):  # a file, not a preset name
        recorded["model"] = there(model)
    for key, cls in (("train", TrainConfig), ("data", StageData)):
        section = recorded.get(key)
        if not isinstance(section, dict):
            continue
        known = {f.name for f in fields(cls)}
        if set(section) - known:  # a run of another version of echox
            log.warning("%s: %s settings this version does not have are left out: %s", path, key,
                        ", ".join(sorted(set(section) - known)))
        recorded[key] = {k: there(v) if key == "data" else v for k, v in section.items() if k in known}
    return recorded


def _recorded_starts(args: argparse.Namespace) -> dict[str, Any] | None:
    """`--resume` with `--recipe`: the run's recorded starting points (`init`, `t2c_from` and
    the `init_sets` given over them) from its recipe.json. Without them the resume built the
    recipe's model, loaded the checkpoint into it where the shapes allowed (an adapter setting
    changed midway) and recorded the run as started from nothing."""
    if args.resume is None or not args.output_dir:
        return None
    path = Path(args.output_dir) / "recipe.json"
    if not path.is_file():
        return None
    recorded = read_json_object(path, ConfigError, "the run's recipe")
    return {k: recorded[k] for k in ("init", "t2c_from", "init_sets") if k in recorded}


def _take_recorded_starts(args: argparse.Namespace, starts: dict[str, Any]) -> bool:
    """Set `args.init` / `args.t2c_from` not given again to the run's recorded ones, and say
    so. A recorded one that is gone (a run deleted once exported) is not used: the model is then
    built from the checkpoint the run resumes (its config and weights), and True is returned
    (the run's record keeps its first starting points)."""
    taken, gone = [], []
    for key, option in (("init", "--init"), ("t2c_from", "--t2c-from")):
        old = starts.get(key)
        if getattr(args, key) is None and isinstance(old, str):
            if os.path.exists(old):
                setattr(args, key, old)
                taken.append(f"{option} {old}")
            else:
                gone.append(f"{option} {old}")
    sets = starts.get("init_sets")
    if taken and isinstance(sets, list) and sets:
        taken.append("--set " + " ".join(f"model.{o}" for o in sets))
    main = os.environ.get("RANK", "0") == "0"
    if taken and main:
        print(f"echox: --resume: the run's own starting points: {', '.join(taken)}", file=sys.stderr)
    if not gone:
        return False
    if str(args.resume) == "latest":
        ckpt = find_latest_checkpoint(Path(args.output_dir))
    else:
        ckpt = Path(args.resume)
        if (ckpt / "checkpoints").is_dir() and not (ckpt / "config.json").exists():
            ckpt = find_latest_checkpoint(ckpt)
    if ckpt is None:
        raise ConfigError(f"--resume: the run started from {' and '.join(gone)}, which no longer "
                          "exists, and it has no checkpoint to build its model from")
    if main:
        print(f"echox: warning: --resume: the run started from {' and '.join(gone)}, which no "
              f"longer exists; its model is built from the checkpoint {ckpt}", file=sys.stderr)
    args.init, args.t2c_from = str(ckpt), None
    return True


def cmd_train(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as held:  # the run folder's lock, let go however the run ends
        args.hold = held.enter_context
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    if args.data is not None:  # one manifest (a string, as every stage takes) or several
        args.data = args.data[0] if len(args.data) == 1 else list(args.data)
    recorded = _recorded_recipe(args)
    recipe = load_stage_recipe(args.recipe, args.set or [], args.override, args.stage, recorded)
    init_sets = _model_sets(args)  # the model settings that apply over an --init checkpoint
    starts = recorded if recorded is not None else _recorded_starts(args)
    from_checkpoint = False  # the recorded --init is gone: the model comes from the checkpoint
    if starts is not None:  # the run's own starting points, and the settings given over them
        from_checkpoint = _take_recorded_starts(args, starts)
        was = starts.get("init_sets")
        given = {o.split("=", 1)[0].strip(): o for o in [*(was if isinstance(was, list) else []), *init_sets]}
        init_sets = list(given.values())  # one per key, the latest (repeated on each resume: once)
    if args.data:
        recipe["data"].train = args.data
    if args.eval_data:
        recipe["data"].eval = args.eval_data
    cfg = train_config(args.stage, recipe, args)
    check_out_path(cfg.output_dir)  # before the model is built and the data read
    if args.resume is None and not args.prepare_data:
        check_no_checkpoints(Path(cfg.output_dir))
    if not args.prepare_data:
        check_run_folder(Path(cfg.output_dir), keep_best=cfg.keep_best)
        try:  # before the model is built: a folder that cannot be made fails now
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise  # the CLI's one line for a folder this user may not write
            raise ConfigError(f"--out {cfg.output_dir}: cannot create the run folder "
                              f"({e.strerror or e})") from e
        lock = lock_run_folder(Path(cfg.output_dir))
        if lock is not None:
            args.hold(lock)  # closed (the lock let go) when cmd_train returns
    for option, given in (("--init", args.init), ("--t2c-from", args.t2c_from)):
        if given and Path(given).exists():  # a run's saves replace out/model and out/best whole
            src = Path(given).resolve()
            for name in ("model", "best"):
                dst = (Path(cfg.output_dir) / name).resolve()
                if dst == src or dst in src.parents:
                    raise ConfigError(f"--out {cfg.output_dir}: its {name}/ is the {option} model "
                                      f"{given}, which the run's save would replace; give another --out")
    if args.stop_at is not None and args.stop_at < 1:
        raise ConfigError(f"--stop-at must be >= 1, got {args.stop_at}")
    model_cfg = None if args.init else load_config(str(recipe["model"]), list(recipe.get("overrides") or []))
    if model_cfg is not None:  # a local base model recorded absolute: the next stage runs elsewhere
        for part in (model_cfg.llm, model_cfg.encoder):
            part.name_or_path = stages.local_or_hub(part.name_or_path)
    model = stages.prepare_model(args.stage, model_cfg, init=args.init, t2c_from=args.t2c_from,
                                 init_overrides=init_sets if args.init else None,
                                 freeze_s2t=cfg.freeze_s2t)
    if args.init and set(recipe.get("overrides") or []) - set(init_sets):
        log.warning("--init given: the model config comes from the checkpoint; the recipe's "
                    "overrides are ignored (`--set model.adapter.*`, `model.loss.*`, "
                    "`model.llm.lora.dropout`, `model.t2c.beams` and `model.t2c.length_penalty` "
                    "still apply)")
    if cfg.cache_encoder:  # before build_data: echo's offline pseudo-labels read it too
        model.enable_feature_cache(encoder_cache_root(cfg))
    train, ev, collate, kwargs = build_data(args.stage, model, cfg, recipe["data"])
    if args.prepare_data:  # sources read (and hub datasets made local) once
        print(json.dumps({"stage": args.stage, "train_examples": len(train),  # type: ignore[arg-type]
                          "eval_examples": len(ev) if ev is not None else 0}))  # type: ignore[arg-type]
        return 0
    if cfg.ctc_vocab == "transcripts":  # before the trainer builds its optimizer
        restrict_ctc_to_transcripts(model, train)
    trainer = Trainer(model, cfg, train, collate, ev, step_kwargs=kwargs)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_now = json.loads(json.dumps(asdict(recipe["data"]), default=str))

    def record() -> None:  # once the run starts: a refused --resume leaves the run's record as it was
        starts = {"init": args.init and os.path.abspath(args.init),
                  "t2c_from": args.t2c_from and os.path.abspath(args.t2c_from)}
        before: list[Any] = []
        if args.resume is not None:  # the run's own record, read once
            was = folder_config(out, "recipe.json") or {}
            before = _data_before(was, data_now)
            starts = ({k: was.get(k) for k in ("init", "t2c_from")} if from_checkpoint  # where it
                      else _starts_before(was, starts))  # started, not the checkpoint it resumed
        atomic_write_text(out / "recipe.json", json.dumps(
            {**recipe, "train": {**asdict(cfg), **trainer.optimizer_settings()}, "data": data_now,
             "cwd": os.getcwd(), **starts,
             "init_sets": init_sets if args.init else [],
             **({"data_before": before} if before else {})}, indent=2, default=str))

    with handled((signal.SIGINT, signal.SIGTERM), trainer.request_stop):
        res = trainer.train(resume=args.resume, stop_at=args.stop_at, on_start=record)
    # a multi-process run's process group is destroyed before exit: left to the interpreter's
    # teardown, gloo's threads could abort a rank ("terminate called without an active exception")
    trainer.acc.wait_for_everyone()  # every rank out of its last collective before any destroys
    trainer.acc.end_training()
    rc = 0
    if res.stopped_by:
        if trainer.acc.is_main_process:
            print(_stopped_line(res), file=sys.stderr)
        rc = 128 + res.stopped_by
    elif trainer.acc.is_main_process:
        print(json.dumps({"stage": args.stage, "train_examples": len(train),  # type: ignore[arg-type]
                          "steps": res.step, "first_loss": _number(res.first_loss),
                          "last_loss": _number(res.last_loss), "steps_per_s": round(res.steps_per_s, 3),
                          "eval": res.eval_losses[-1:] or None,
                          # the stage's model once max_steps are done; none after --stop-at
                          "output": str(out / "model") if res.step >= cfg.max_steps else None}))
    if trainer.acc.num_processes > 1:
        _exit_without_teardown(rc)
    return rc


def _exit_without_teardown(rc: int) -> None:
    """End a rank of a multi-process launch here, its work saved and its output flushed.

    Freeing the DDP model as the command returns destroys gloo's process group while holding
    the GIL; its destructor joins gloo's worker thread, which may still be freeing the last
    barrier's tensors and waits for the GIL: the rank hangs, and the launch with it (seen about
    1 run in 5 of the 2-process test; py-spy: `~ProcessGroupGloo` -> `std::thread::join` beside
    `AsyncBarrierWork::~AsyncBarrierWork` -> `gil_scoped_acquire`). Nothing is left to write."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(rc)


def _number(x: float) -> float | None:
    """A loss for the JSON summary: None when no step ran (NaN is not JSON)."""
    return None if math.isnan(x) else round(x, 4)


def _model_sets(args: argparse.Namespace) -> list[str]:
    """The `--set model.*` options, as model overrides."""
    return [s.strip()[len("model."):] for s in (args.set or []) if s.strip().startswith("model.")]


def stage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="recipe YAML (model, train, data); e.g. recipes/tiny/s2t.yaml")
    p.add_argument("--override", metavar="YAML",
                   help="a second recipe file applied over --recipe: its model and overrides "
                        "replace the recipe's, its train and data keys replace theirs one by one "
                        "(e.g. tiny sizes and local data for a dry run of a GPU recipe)")
    p.add_argument("--prepare-data", action="store_true",
                   help="read the data sources (writing hub datasets' audio and manifests, see "
                        "docs/scale.md), print the example counts and stop; run it once before a "
                        "multi-process launch")
    p.add_argument("--data", nargs="+", help="training manifest (dialogues JSONL for s2t/echo, TTS JSONL "
                   "with units for t2c); s2t/echo take several, read as one (e.g. QA + ASR turns)")
    p.add_argument("--eval-data", help="evaluation manifest")
    p.add_argument("--out", dest="output_dir", help="output folder (checkpoints, logs, model/)")
    p.add_argument("--init", help="start from this EchoX checkpoint (echo: the Stage I output)")
    p.add_argument("--t2c-from", help="echo: take the trained T2C from this Stage II checkpoint")
    p.add_argument("--resume", nargs="?", const="latest", help="resume: 'latest' (the --out run's newest checkpoint), a checkpoint folder, or "
                        "another run folder (its newest checkpoint)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--target", choices=["pseudo", "gold-units"],
                   help="echo: pseudo-labels from the frozen T2C (EchoX) or gold units (baseline)")
    p.add_argument("--pseudo-labels", choices=["online", "offline"])
    p.add_argument("--threads", type=int_at_least(0, MAX_THREADS),
                   help="torch threads per process (1 on a busy CPU; 0 = torch's default)")
    p.add_argument("--stop-at", type=int, help="stop after this step (checkpoints stay resumable)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override, e.g. --set train.warmup_steps=10 --set model.llm.lora.r=8")

