"""`echox units`: make speech units and the unit language from manifests (docs/units.md).

The pipeline, one subcommand per step::

    echox units train-kmeans --manifest data/tiny/train/tts.jsonl \\
        --features whisper:openai/whisper-tiny.en --layer 3 --k 500 --out runs/units/km.joblib
    echox units extract --manifest data/tiny/train/tts.jsonl --kmeans runs/units/km.joblib \\
        --out runs/units/tts_units.jsonl
    echox units attach --dialogues data/tiny/train/dialogues.jsonl \\
        --tts-units runs/units/tts_units.jsonl --out runs/units/dialogues_units.jsonl
    echox units train-language --manifest runs/units/tts_units.jsonl --vocab-size 2000 \\
        --kmeans runs/units/km.joblib --out runs/units/language
    echox units stats --manifest runs/units/tts_units.jsonl --kmeans runs/units/km.joblib \\
        --vocab-sizes 1000,2000,4000,8000 --png runs/units/stats.png

`train-kmeans` writes `<out>.json` next to the k-means file (feature spec, layer, K), so
`extract` needs only `--kmeans`. Manifests keep every field they had; output audio paths are
rewritten relative to the output file. Run lengths (frames per unit) are not part of the TTS
schema: they live in the extraction cache, one JSON file per utterance.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from echox.config import MAX_THREADS, int_at_least
from echox.data.manifest import read_jsonl, write_jsonl
from echox.errors import ManifestError, UnitError
from echox.fileio import (atomic_dir, atomic_write_text, check_out_path, check_plot_path,
                          check_replaceable, json_lines)
from echox.units.extract import (
    CACHE_META,
    HubertFeatures,
    UnitExtractor,
    WhisperLayerFeatures,
    extract_corpus,
    train_kmeans_on_corpus,
)
from echox.units.kmeans import UnitKMeans
from echox.units.language import META_FILE, UnitLanguage, compression_stats, plot_stats

__all__ = [
    "FeatureSpec", "Manifest", "cmd_attach", "cmd_extract", "cmd_stats",
    "cmd_train_kmeans", "cmd_train_language", "kmeans_meta_path", "read_manifest", "split_heldout",
]

FEATURE_KINDS = ("whisper", "hubert")


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class FeatureSpec:
    """`whisper:<model>` or `hubert:<model>`: which network's hidden layer makes the units."""

    kind: Literal["whisper", "hubert"]
    model: str

    @classmethod
    def parse(cls, spec: str) -> FeatureSpec:
        kind, sep, model = spec.partition(":")  # the model may hold ':' itself (builtin:...)
        if not sep or kind not in FEATURE_KINDS or not model.strip():
            raise UnitError(
                f"--features {spec!r}: expected whisper:<model> or hubert:<model>, "
                "e.g. whisper:openai/whisper-tiny.en"
            )
        return cls(kind, model)  # type: ignore[arg-type]

    def build(self, layer: int, device: str | None = None,
              window_seconds: float | None = None) -> Any:
        """The FeatureExtractor for `layer` (imported lazily: loading a model is slow)."""
        if self.kind == "whisper":
            return WhisperLayerFeatures(self.model, layer=layer, device=device,
                                        window_seconds=window_seconds)
        if window_seconds is not None:
            raise UnitError("--window-seconds applies to whisper: features only")
        return HubertFeatures(self.model, layer=layer, device=device)

    def __str__(self) -> str:
        return f"{self.kind}:{self.model}"


@dataclass
class Manifest:
    """A JSONL manifest read both as validated records and as its raw objects (extra keys kept)."""

    path: Path
    kind: Literal["tts", "dialogue"]
    records: list[Any]  # TtsRecord | DialogueRecord
    raw: list[dict[str, Any]]  # the JSON object of each record, same order
    lines: list[int]

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def key(self, i: int) -> str:
        """A stable id of record i: its `id`, else its line (ids are what caches are keyed on)."""
        rid = self.records[i].id
        return rid if rid is not None else f"{self.path.name}:{self.lines[i]}"

    def audio_path(self, ref: str) -> Path:
        p = Path(ref).expanduser()
        return p if p.is_absolute() else self.base_dir / p


def read_manifest(path: str | os.PathLike, kind: str | None = None) -> Manifest:
    """Read a TTS (`audio`/`text`/`units`) or dialogues (`conversations`) JSONL manifest.

    `kind=None` decides from the first record: `conversations` means dialogues.
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"{p}: manifest file not found")
    # split on "\n" only, as read_jsonl does: str.splitlines() also breaks at U+2028 and friends
    lines = p.read_bytes().decode("utf-8", errors="replace").split("\n")
    if kind is None:
        first = next(json_lines(p), None)  # a line too deep or too long to read is an error too
        if first is None:
            raise ManifestError(f"{p}: the manifest is empty")
        if first.error is not None:
            raise ManifestError(f"{p}:{first.lineno}: first record is {first.error}")
        obj = first.value
        if isinstance(obj, dict) and not {"conversations", "audio", "text"} & set(obj):
            # a dialogue in another layout ("messages", "turns") is not a TTS record missing "text"
            keys = ", ".join(repr(k) for k in sorted(obj)[:8]) or "none"
            raise ManifestError(f"{p}:{first.lineno}: the first record is neither a TTS record "
                                "('audio', 'text') nor a dialogue ('conversations': [{'from', "
                                f"'value', 'audio'?}}, ...]); its keys: {keys}")
        kind = "dialogue" if isinstance(obj, dict) and "conversations" in obj else "tts"
    rep = read_jsonl(p, kind, on_error="stop")
    if not rep.records:
        raise ManifestError(f"{p}: no records")
    raw = [json.loads(lines[n - 1]) for n in rep.lines]
    return Manifest(p, kind, rep.records, raw, rep.lines)  # type: ignore[arg-type]


def _rebase(ref: Any, src: Path, dst: Path) -> Any:
    """A relative audio path of a manifest in `src`, rewritten for a manifest in `dst`."""
    if not isinstance(ref, str) or Path(ref).is_absolute() or src.resolve() == dst.resolve():
        return ref
    return os.path.relpath((src / ref).resolve(), dst.resolve())


def _rebase_obj(obj: dict[str, Any], src: Path, dst: Path) -> dict[str, Any]:
    out = dict(obj)
    if "audio" in out:
        out["audio"] = _rebase(out["audio"], src, dst)
    if isinstance(out.get("conversations"), list):
        out["conversations"] = [
            {**m, "audio": _rebase(m["audio"], src, dst)} if isinstance(m, dict) and "audio" in m else m
            for m in out["conversations"]
        ]
    return out


def kmeans_meta_path(kmeans_path: str | os.PathLike) -> Path:
    """`km.joblib` -> `km.joblib.json`: how the k-means was made (features, layer, K)."""
    return Path(str(kmeans_path) + ".json")


def split_heldout(n: int, heldout: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, held-out) index split; held-out gets round(n * heldout), at least 1."""
    if not 0.0 <= heldout < 1.0:
        raise UnitError(f"--heldout must be in [0, 1), got {heldout}")
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_held = 0 if heldout == 0 else min(n - 1, max(1, round(n * heldout)))
    if heldout > 0 and n_held < 1:
        raise UnitError(f"need at least 2 sequences to hold some out, got {n}")
    return sorted(order[n_held:]), sorted(order[:n_held])


def _unit_sequences(paths: Sequence[str], exclude_suffixes: Sequence[str]) -> list[tuple[str, list[int]]]:
    """(id, units) of every TTS record / assistant turn with units, ids ending in a suffix dropped."""
    out: list[tuple[str, list[int]]] = []
    for path in paths:
        m = read_manifest(path)
        for i, rec in enumerate(m.records):
            key = m.key(i)
            if any(key.endswith(s) for s in exclude_suffixes):
                continue
            if m.kind == "tts":
                if rec.units:
                    out.append((key, rec.units))
            else:
                turns = [t for t in rec.conversations if t.role == "assistant" and t.units]
                out.extend((f"{key}#a{k}", t.units) for k, t in enumerate(turns))
    if not out:
        raise UnitError(f"{', '.join(paths)}: no records with units (run `echox units extract` first)")
    return out


def _device(name: str | None) -> str | None:
    """`--device`, checked before any model is loaded onto it (None: the default)."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UnitError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnitError(f"--device {name}: this machine has no CUDA GPU that torch can use")
    return name


def _out_file(path: str | os.PathLike, option: str, inputs: Sequence[str | os.PathLike]) -> Path:
    """An output file, checked before any slow work: not a folder, not below a file, and not
    one of the `inputs` (writing it would replace what the command reads)."""
    out = check_out_path(path, option, folder=False)
    for src in inputs:
        if out.is_file() and Path(src).is_file() and os.path.samefile(out, src):
            raise UnitError(f"{option} {out} is the input {src}: writing it would replace the "
                            "input; give another file")
    for parent in out.resolve().parents:  # e.g. --json LANG/tokenizer.json
        if (parent / META_FILE).is_file():
            raise UnitError(f"{option} {out} lies inside the unit language {parent}: writing it "
                            "could replace the language's files; give a path outside it")
    return out


def _check_not_a_recording(out: Path, items: Sequence[tuple[str, Path]], what: str) -> None:
    """Refuse an output file that is the audio of one of the records `items` (key, path)."""
    if out.is_file() and any(a.is_file() and os.path.samefile(a, out) for _, a in items):
        raise UnitError(f"{what} is the audio of a manifest record: writing it would replace the "
                        "recording; give another file")


def _check_cache_dir(cache: Path) -> None:
    """`--cache` must be a folder that is new, empty or an extraction cache (hash-named
    shards, `extractor.json`): shards are never written among other files."""
    if cache.exists() and not cache.is_dir():
        raise UnitError(f"--cache {cache} is a file; give a folder")
    check_out_path(cache, "--cache")
    if cache.is_dir() and not (cache / CACHE_META).is_file():
        other = sorted(x.name for x in cache.iterdir()
                       if not (x.is_dir() and re.fullmatch(r"[0-9a-f]{2}", x.name)))
        if other:
            shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
            raise UnitError(f"--cache {cache} holds other files ({shown}), not a unit cache; "
                            "give a new or empty folder")


def _num_units(args: argparse.Namespace, seqs: list[tuple[str, list[int]]]) -> int:
    """K from --num-units, else from --kmeans, else the largest unit + 1 (with a note)."""
    if args.num_units is not None:
        k = int(args.num_units)
        if k < 1:
            raise UnitError(f"--num-units must be >= 1, got {k}")
    elif args.kmeans:
        k = UnitKMeans.load(args.kmeans).n_clusters
    else:
        k = max(max(u) for _, u in seqs) + 1
        print(f"[units] --num-units not given: using the largest unit + 1 = {k}", file=sys.stderr)
    top = max(max(u) for _, u in seqs)
    if top >= k:
        given = ("--num-units" if args.num_units is not None else f"the k-means {args.kmeans}")
        raise UnitError(f"the manifest holds unit {top}, but {given} gives only {k} units "
                        f"(0..{k - 1})")
    return k


# ----------------------------------------------------------------------------- commands


def _kmeans_items(paths: Sequence[str], roles: str) -> list[tuple[str, Path]]:
    """Every distinct audio file of the manifests: TTS audio, dialogue user / assistant audio."""
    want = {"user", "assistant"} if roles == "both" else {roles}
    seen: set[str] = set()
    items: list[tuple[str, Path]] = []
    for path in paths:
        m = read_manifest(path)
        refs: list[Any] = []
        for rec in m.records:
            if m.kind == "tts":
                refs.append(rec.audio)
            else:
                refs.extend(t.audio for t in rec.conversations if t.role in want)
        for ref in refs:
            if not isinstance(ref, str):
                continue
            p = m.audio_path(ref).resolve()
            if str(p) not in seen:
                seen.add(str(p))
                items.append((str(p), p))
    if not items:
        raise UnitError(f"{', '.join(paths)}: no audio files to train k-means on")
    return items


def cmd_train_kmeans(args: argparse.Namespace) -> int:
    spec = FeatureSpec.parse(args.features)
    if args.k < 1:
        raise UnitError(f"--k must be >= 1, got {args.k}")
    if args.max_frames < args.k:
        raise UnitError(f"--k {args.k} needs at least that many frames, but --max-frames is {args.max_frames}")
    if args.batch_size < 1:
        raise UnitError(f"--batch-size must be >= 1, got {args.batch_size}")
    _out_file(args.out, "--out", args.manifest)
    _out_file(kmeans_meta_path(args.out), "k-means side file", args.manifest)
    items = _kmeans_items(args.manifest, args.dialogue_roles)
    # not one of the recordings it reads (it replaced one, exit 0)
    _check_not_a_recording(Path(args.out), items, f"--out {args.out}")
    _check_not_a_recording(kmeans_meta_path(args.out), items,
                           f"--out {args.out}: its side file {kmeans_meta_path(args.out)}")
    t0 = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    feats = spec.build(args.layer, _device(args.device))
    from threadpoolctl import threadpool_limits  # scikit-learn's k-means threads (OpenMP, BLAS)

    with threadpool_limits(limits=args.threads):
        km = train_kmeans_on_corpus(items, feats, n_clusters=args.k, max_frames=args.max_frames,
                                    seed=args.seed, batch_size=args.batch_size,
                                    progress=not args.quiet)
    meta = {"features": str(spec), "layer": args.layer, "k": km.n_clusters, "dim": km.dim,
            "max_frames": args.max_frames, "seed": args.seed,
            "manifests": [str(Path(m).resolve()) for m in args.manifest]}
    # The old side file goes first: a run killed between the two writes leaves a k-means
    # without one (extract then asks for --features/--layer), never one that names another
    # layer or K.
    kmeans_meta_path(args.out).unlink(missing_ok=True)
    km.save(args.out)
    atomic_write_text(kmeans_meta_path(args.out), json.dumps(meta, indent=1) + "\n")
    print(f"k-means K={km.n_clusters} on {spec} layer {args.layer} ({len(items)} audio files) "
          f"-> {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0


def _extractor_spec(args: argparse.Namespace, km: UnitKMeans) -> tuple[FeatureSpec, int]:
    """--features/--layer, defaulting to (and checked against) the k-means' side file."""
    meta_path = kmeans_meta_path(args.kmeans)
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as err:
            raise UnitError(f"{meta_path}: not readable JSON ({err})") from err
        if (not isinstance(meta, dict)
                or not isinstance(meta.get("features", ""), str)
                or isinstance(meta.get("layer"), bool)
                or not isinstance(meta.get("layer", 0), int)):
            raise UnitError(f"{meta_path}: not a k-means side file (expected an object with a "
                            "string 'features' and an integer 'layer')")
        for key, have in (("k", km.n_clusters), ("dim", km.dim)):
            if key in meta and meta[key] != have:
                raise UnitError(f"{meta_path} describes a k-means with {key} {meta[key]}, but "
                                f"{args.kmeans} has {have}: the side file belongs to another "
                                "k-means (train it again, or remove the side file and give "
                                "--features and --layer)")
    features = args.features or meta.get("features")
    layer = args.layer if args.layer is not None else meta.get("layer")
    if features is None or layer is None:
        raise UnitError(f"give --features and --layer ({meta_path} does not say how "
                        f"{args.kmeans} was trained)")
    for name, given, known in (("--features", args.features, meta.get("features")),
                               ("--layer", args.layer, meta.get("layer"))):
        if given is not None and known is not None and str(given) != str(known):
            raise UnitError(f"{name} {given} differs from {known}, which {args.kmeans} was "
                            f"trained on ({meta_path}); its units would be meaningless")
    return FeatureSpec.parse(features), int(layer)


def cmd_extract(args: argparse.Namespace) -> int:
    out = _out_file(args.out, "--out", [args.manifest, args.kmeans, kmeans_meta_path(args.kmeans)])
    cache = Path(args.cache) if args.cache else out.with_name(out.stem + ".cache")
    if cache.resolve() == out.resolve() or cache.resolve() in out.resolve().parents:
        raise UnitError(f"--out {out} is or lies in the cache folder {cache}; give another "
                        "--out or --cache")
    _check_cache_dir(cache)
    if args.window_seconds is not None and not (math.isfinite(args.window_seconds)
                                                and args.window_seconds > 0):
        raise UnitError(f"--window-seconds must be a number of seconds > 0, got {args.window_seconds}")
    m = read_manifest(args.manifest)
    if m.kind != "tts":
        raise UnitError(f"{m.path} is a dialogues manifest: extract units from the TTS manifest "
                        "of the responses, then `echox units attach` them")
    km = UnitKMeans.load(args.kmeans)
    spec, layer = _extractor_spec(args, km)
    items: list[tuple[str, Path]] = []
    for i, rec in enumerate(m.records):
        if not isinstance(rec.audio, str):
            raise ManifestError(f"{m.path}:{m.lines[i]}: record has no audio to extract units from")
        items.append((m.key(i), m.audio_path(rec.audio)))
    _check_not_a_recording(out, items, f"--out {out}")  # checked before the slow part
    t0 = time.perf_counter()
    if args.threads is not None:  # >= 1: checked by the parser
        torch.set_num_threads(args.threads)
    extractor = UnitExtractor(spec.build(layer, _device(args.device), args.window_seconds), km)
    report: dict[str, int] = {}
    units = extract_corpus(items, extractor, cache, batch_size=args.batch_size,
                           progress=not args.quiet, on_error="skip" if args.skip_bad_audio else "raise",
                           report=report)
    rows, n_units, n_frames = [], 0, 0
    for i, obj in enumerate(m.raw):
        seq = units.get(m.key(i))
        if seq is None:  # unreadable or too-short audio, skipped with a warning
            continue
        rows.append(_rebase_obj({**obj, "units": seq.units, "counts": seq.counts}, m.base_dir, out.parent))
        n_units += len(seq.units)
        n_frames += seq.num_frames
    if not rows:
        raise UnitError(f"{m.path}: no utterance gave units")
    write_jsonl(out, rows)
    dropped = report["dropped"]
    print(f"units for {len(rows)}{f' of {len(items)}' if dropped else ''} records "
          f"({report['cached']} from cache, {report['computed']} computed"
          f"{f', {dropped} dropped' if dropped else ''}): {n_units} units from {n_frames} frames "
          f"({100 * n_units / max(n_frames, 1):.0f}% kept after dedup) -> {out} "
          f"[run lengths in {cache}] in {time.perf_counter() - t0:.1f}s")
    return 0


def _norm_text(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def _units_by_id(t: Manifest) -> dict[str, Any]:
    """The records of a TTS manifest that have units, by id. An id on several records is an
    error unless they carry the same units and text (then any one of them will do)."""
    first: dict[str, int] = {}
    for i, rec in enumerate(t.records):
        j = first.setdefault(t.key(i), i)
        other = t.records[j]
        if other.units != rec.units or _norm_text(other.text) != _norm_text(rec.text):
            what = "units" if other.units != rec.units else "text"
            raise UnitError(f"--tts-units {t.path}: id {t.key(i)!r} is on lines {t.lines[j]} and "
                            f"{t.lines[i]} with different {what}; give each record its own id")
    return {key: t.records[i] for key, i in first.items() if t.records[i].units}


def cmd_attach(args: argparse.Namespace) -> int:
    out = _out_file(args.out, "--out", [args.dialogues, args.tts_units])
    d = read_manifest(args.dialogues)
    t = read_manifest(args.tts_units)
    if d.kind != "dialogue":
        raise UnitError(f"--dialogues {d.path}: not a dialogues manifest (no 'conversations')")
    if t.kind != "tts":
        raise UnitError(f"--tts-units {t.path}: not a TTS manifest")
    by_id = _units_by_id(t)
    if not by_id:
        raise UnitError(f"{t.path}: no record has units (run `echox units extract` first)")
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    mismatched: list[str] = []
    n_turns = n_done = 0
    for i, rec in enumerate(d.records):
        key = d.key(i)
        asst = [j for j, msg in enumerate(rec.conversations) if msg.role == "assistant"]
        keys = [key] if len(asst) == 1 else [f"{key}-a{k}" for k in range(len(asst))]
        found = [by_id.get(k) for k in keys]
        if not asst or any(f is None for f in found):
            missing.append(key)
            if args.on_missing == "keep":
                rows.append(_rebase_obj(d.raw[i], d.base_dir, out.parent))
            continue
        obj = dict(d.raw[i])
        conv = list(obj["conversations"])
        for j, k, tts in zip(asst, keys, found):
            assert tts is not None
            if not args.no_text_check and _norm_text(tts.text) != _norm_text(rec.conversations[j].value):
                mismatched.append(k)
            conv[j] = {**conv[j], "units": tts.units}
            n_turns += 1
        obj["conversations"] = conv
        n_done += 1
        rows.append(_rebase_obj(obj, d.base_dir, out.parent))
    if mismatched:
        raise UnitError(f"{len(mismatched)} assistant turn(s) differ in text from their TTS record "
                        f"(first: {mismatched[0]!r}); pass --no-text-check if that is intended")
    # nothing matched: wrong files or ids, not a result to write (in every --on-missing mode,
    # so that one is not the fix to offer)
    if d.records and n_done == 0:
        raise UnitError(f"no dialogue of {d.path} has its units in {t.path} (no TTS id such "
                        f"as {d.key(0)!r}, or {d.key(0) + '-a0'!r} for a dialogue of several "
                        "answers); check that the TTS records are these dialogues' responses")
    if missing and args.on_missing == "error":
        raise UnitError(f"{len(missing)} of {len(d.records)} dialogues have no units in {t.path} "
                        f"(first: {missing[0]!r}); use --on-missing drop|keep to go on without them")
    write_jsonl(out, rows)
    print(f"attached units to {n_turns} assistant turns of {n_done} dialogues ({len(missing)} without units, --on-missing {args.on_missing}) -> {out}")
    return 0


def _stats_line(s: dict[str, float], asked: int | None = None, note: str = "") -> str:
    size = f"{int(s['vocab_size'])}" + (f" (asked {asked})" if asked and asked != s["vocab_size"] else "")
    size += f" ({note})" if note else ""
    return (f"| {size} | {s['units_per_token']:.2f} | {s['units_p50']:.0f} / {s['units_p90']:.0f} / "
            f"{s['units_p99']:.0f} | {s['tokens_p50']:.0f} / {s['tokens_p90']:.0f} / {s['tokens_p99']:.0f} |")


_TABLE_HEAD = ("| vocab size | units/token | units p50 / p90 / p99 | tokens p50 / p90 / p99 |\n"
               "|---|---|---|---|")


def _language_dir(path: str | os.PathLike, option: str) -> Path:
    """A unit-language folder to be replaced whole: new, empty or an earlier unit language
    (never a folder of other files, such as a model's, whose tokenizer.json it would replace)."""
    check_out_path(path, option)
    return check_replaceable(path, f"saving a unit language ({option})", error=UnitError,
                             is_earlier_save=lambda d: (d / META_FILE).is_file())


def _save_language(lang: UnitLanguage, folder: Path, info: dict[str, Any] | None = None) -> None:
    """Write the language (and its train_stats.json) in one rename: a killed run leaves the
    old folder or the new one, never a mix."""
    with atomic_dir(folder) as tmp:
        lang.save(tmp)
        if info is not None:
            (tmp / "train_stats.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def _train_stats(lang: UnitLanguage, k: int, asked: int, args: argparse.Namespace, n_train: int,
                 held: list[list[int]]) -> dict[str, Any]:
    """A saved language's train_stats.json: its real `vocab_size` (BPE may stop short of the
    `asked` size), how it was trained, and its compression on the held-out sequences."""
    info: dict[str, Any] = {"num_units": k, "vocab_size": lang.vocab_size, "asked_vocab_size": asked,
                            "max_token_units": args.max_token_units, "train_sequences": n_train,
                            "heldout_sequences": len(held), "seed": args.seed}
    if held:
        info["heldout"] = compression_stats(lang, held)
    return info


def cmd_train_language(args: argparse.Namespace) -> int:
    out = _language_dir(args.out, "--out")
    if args.min_frequency < 0:
        raise UnitError(f"--min-frequency must be >= 0, got {args.min_frequency}")
    seqs = _unit_sequences(args.manifest, args.exclude_id_suffix)
    k = _num_units(args, seqs)
    train_idx, held_idx = split_heldout(len(seqs), args.heldout, args.seed)
    t0 = time.perf_counter()
    lang = UnitLanguage.train([seqs[i][1] for i in train_idx], num_units=k, vocab_size=args.vocab_size,
                              max_token_units=args.max_token_units, min_frequency=args.min_frequency)
    info = _train_stats(lang, k, args.vocab_size, args, len(train_idx), [seqs[i][1] for i in held_idx])
    _save_language(lang, out, info)
    print(f"unit language: {lang.vocab_size} tokens over K={k} units, trained on {len(train_idx)} "
          f"sequences in {time.perf_counter() - t0:.1f}s -> {args.out}")
    if held_idx:
        print(f"held-out {len(held_idx)} sequences:\n{_TABLE_HEAD}\n"
              f"{_stats_line(info['heldout'], args.vocab_size)}")
    return 0


def _vocab_sizes(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise UnitError(f"--vocab-sizes {text!r}: expected comma-separated integers") from err
    return sizes


def cmd_stats(args: argparse.Namespace) -> int:
    sizes = _vocab_sizes(args.vocab_sizes)
    if not sizes and not args.language:
        raise UnitError("give --vocab-sizes to train languages, or --language DIR to load them")
    # every output is checked before any language is trained
    inputs = [*args.manifest, *([args.kmeans, kmeans_meta_path(args.kmeans)] if args.kmeans else []),
              *(f for d in args.language or [] if Path(d).is_dir() for f in Path(d).iterdir())]
    if args.json:
        _out_file(args.json, "--json", inputs)
    if args.png:
        _out_file(args.png, "--png", inputs)
        check_plot_path(args.png, "--png")
    save_dirs = {v: _language_dir(Path(args.save_dir) / f"v{v}", "--save-dir")
                 for v in sizes} if args.save_dir else {}
    for option, given in (("--json", args.json), ("--png", args.png)):
        for d in save_dirs.values():  # a language written there would be replaced whole
            if given and (d.resolve() == Path(given).resolve() or d.resolve() in Path(given).resolve().parents):
                raise UnitError(f"{option} {given} lies inside {d}, where --save-dir writes a "
                                "language; give a path outside it")
    seqs = _unit_sequences(args.manifest, args.exclude_id_suffix)
    given_k = args.num_units is not None or bool(args.kmeans)  # K named: languages must have it
    k = _num_units(args, seqs) if sizes or given_k else 0
    for v in sizes:
        if v < k:
            raise UnitError(f"--vocab-sizes: {v} is smaller than the {k} units")
    train_idx, held_idx = split_heldout(len(seqs), args.heldout, args.seed)
    if not held_idx:
        raise UnitError("--heldout 0 leaves nothing to measure on")
    held = [seqs[i][1] for i in held_idx]
    rows: list[tuple[int | None, dict[str, float]]] = []
    notes: list[str] = []
    top = max(max(u) for u in held if u) if any(held) else -1
    for d in args.language or []:
        loaded = UnitLanguage.load(d)
        if given_k and loaded.num_units != k:
            given = "--num-units" if args.num_units is not None else f"the k-means {args.kmeans}"
            raise UnitError(f"--language {d} has K={loaded.num_units} units, but {given} gives "
                            f"{k}: it belongs to another k-means")
        if top >= loaded.num_units:
            raise UnitError(f"--language {d} has K={loaded.num_units} units, but the manifest "
                            f"holds unit {top}: it belongs to another k-means")
        rows.append((None, compression_stats(loaded, held)))
        notes.append(f"loaded {d}")
    for v in sizes:
        t0 = time.perf_counter()
        lang = UnitLanguage.train([seqs[i][1] for i in train_idx], num_units=k, vocab_size=v,
                                  max_token_units=args.max_token_units, min_frequency=args.min_frequency)
        if v in save_dirs:  # with its train_stats.json, as train-language writes it
            _save_language(lang, save_dirs[v], _train_stats(lang, k, v, args, len(train_idx), held))
        rows.append((v, compression_stats(lang, held)))
        notes.append("")
        print(f"[units] vocab {v}: trained in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    print(f"{len(seqs)} sequences: {len(train_idx)} to train, {len(held_idx)} held out "
          f"(max {args.max_token_units} units per token)\n{_TABLE_HEAD}")
    for (asked, s), note in zip(rows, notes):
        print(_stats_line(s, asked, note))
    stats = [s for _, s in rows]
    if args.png:
        plot_stats(stats, args.png)
        print(f"plot -> {args.png}")
    if args.json:
        atomic_write_text(args.json, json.dumps([{"asked_vocab_size": a, **s} for a, s in rows],
                                                indent=1) + "\n")
    return 0


# ----------------------------------------------------------------------------- parser


def _common_lang(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", action="append", required=True,
                   help="TTS units manifest (from `extract`) or dialogues with units; repeatable")
    p.add_argument("--num-units", type=int, help="K, the number of k-means units (default: from --kmeans)")
    p.add_argument("--kmeans", help="the k-means file, to read K from")
    p.add_argument("--max-token-units", type=int, default=8, help="longest token, in units")
    p.add_argument("--min-frequency", type=int, default=2, help="least count of an n-gram to merge")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction held out to measure compression")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the held-out split")
    p.add_argument("--exclude-id-suffix", action="append", default=[], metavar="SUFFIX",
                   help="skip records whose id ends so; e.g. --exclude-id-suffix=-q drops the tiny "
                        "corpus' questions (write it with '=' when it starts with '-')")


def train_kmeans_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", action="append", required=True,
                   help="TTS (audio) or dialogues JSONL; repeatable")
    p.add_argument("--features", required=True, help="whisper:<model> or hubert:<model>")
    p.add_argument("--layer", type=int, required=True, help="hidden layer (2-3 of tiny.en resynthesize best: docs/units.md)")
    p.add_argument("--k", type=int, default=500, help="number of clusters (units)")
    p.add_argument("--max-frames", type=int, default=200_000, help="frames sampled for the fit")
    p.add_argument("--dialogue-roles", choices=["user", "assistant", "both"], default="both",
                   help="which turns' audio of a dialogues manifest to use")
    p.add_argument("--out", required=True, help="k-means file (.joblib, or .npy for centroids)")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", help="cpu / cuda (default: the GPU when there is one)")
    p.add_argument("--threads", type=int_at_least(1, MAX_THREADS),
                   help="torch and k-means threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")



def extract_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="TTS JSONL with audio")
    p.add_argument("--kmeans", required=True, help="k-means file from train-kmeans")
    p.add_argument("--features", help="whisper:<model> or hubert:<model> (default: the k-means' side file)")
    p.add_argument("--layer", type=int, help="hidden layer (default: the k-means' side file)")
    p.add_argument("--out", required=True, help="output TTS JSONL with units")
    p.add_argument("--cache", help="per-utterance cache (units + run lengths); default: beside "
                                   "--out, named as it with .cache for its suffix (u.jsonl: u.cache/)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--skip-bad-audio", action="store_true", help="drop audio that cannot be read or that the speech model cannot take "
                        "(too short, NaN samples; a warning names each), don't stop")
    p.add_argument("--device", help="cpu / cuda (default: the GPU when there is one)")
    p.add_argument("--window-seconds", type=float,
                   help="whisper features: pad each utterance to this window instead of 30 s "
                        "(faster; units differ slightly, docs/units.md)")
    p.add_argument("--threads", type=int_at_least(1, MAX_THREADS), help="torch threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")



def attach_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dialogues", required=True, help="dialogues JSONL; a dialogue id X matches TTS id X")
    p.add_argument("--tts-units", required=True,
                   help="TTS JSONL with units (from extract); an id may repeat only on records "
                        "with the same units and text, else it is an error")
    p.add_argument("--out", required=True, help="output dialogues JSONL")
    p.add_argument("--on-missing", choices=["error", "drop", "keep"], default="error",
                   help="a dialogue without units: stop, leave it out, or keep it without units")
    p.add_argument("--no-text-check", action="store_true",
                   help="don't require the TTS text to equal the assistant turn's text")



def train_language_options(p: argparse.ArgumentParser) -> None:
    _common_lang(p)
    p.add_argument("--vocab-size", type=int, required=True, help="tokens, single units included")
    p.add_argument("--out", required=True, help="output folder (tokenizer.json, unit_language.json)")



def stats_options(p: argparse.ArgumentParser) -> None:
    _common_lang(p)
    p.add_argument("--vocab-sizes", help="comma-separated sizes to train, e.g. 1000,2000,4000,8000")
    p.add_argument("--language", action="append", help="also measure this saved language; repeatable")
    p.add_argument("--save-dir", help="save each trained language into <dir>/v<size>")
    p.add_argument("--png", help="write the plot here")
    p.add_argument("--json", help="write the rows here")

