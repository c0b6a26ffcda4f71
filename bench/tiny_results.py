"""The measured table of the EchoX-Tiny model card: Echo vs the gold-unit baseline.

    python bench/tiny_results.py --echo runs/tiny/bundle-echo --gold runs/tiny/bundle-gold \
        --t2c runs/tiny/t2c/model --out runs/tiny/eval --threads 1 [--n 8]

On the test questions of the tiny corpus (`--data`, default data/tiny/test) it measures, for
each bundle given (either may be left out):

- text-LLM accuracy: the base LLM of `--config` with its system prompt answers the question
  text (`echox eval --mode text`; the upper bound, the same for both bundles);
- cascade accuracy: `--asr` (Whisper tiny.en) transcribes the spoken question and the same
  text LLM answers the transcript (`--mode cascade`): what an ear as good as that ASR would
  give, the same for both bundles;
- S2T accuracy on the piper voice (`qa.jsonl`, `--mode s2t`) and on the espeak-ng en-us copy
  (`qa_espeak.jsonl`);
- S2S accuracy: the spoken answer -> Whisper tiny.en -> the match rule (`--mode s2s`);
- ASR-WER: corpus WER of each spoken answer's transcript against the same turn's text answer;
- T2C intelligibility WER: each test answer's text (`tts_units.jsonl`) -> the bundle's T2C
  units (`model.units_from_text`) -> the bundle's vocoder -> Whisper tiny.en, against the text.
  A slim bundle stores no T2C: `--t2c CHECKPOINT` (the frozen Stage II) stands in for it. It is
  computed once when both bundles have the same T2C weights, unit language and vocoder;
- first-audio latency (median, p90) from the s2s run's per-item engine stats;
- the S2T - S2S gap per bundle and a paired bootstrap 95 % interval of gap_echo - gap_gold over
  the questions (per question gap_i = s2t_hit_i - s2s_hit_i; questions resampled with
  replacement, `--resamples` times, seed `--seed`).

Each eval run is an ordinary `echox eval` folder under `--out`: `text`, `<bundle>-s2t`,
`<bundle>-s2s`, `<bundle>-s2t-espeak` (the names `recipes/tiny/pipeline.sh` gives its eval
runs, so `--out runs/tiny/eval` reuses them), plus `<bundle>-t2c`. Runs resume: only the items
missing from a folder's `items.jsonl` are answered, and a bundle is loaded only when one of its
runs has work left, so a rerun on finished folders just rebuilds the table. Each folder gets a
`run.json` with its settings; reusing a folder made with other settings is an error. Two bundle
options naming the same folder share their runs; two bundles with the same S2T part (equal
encoder, adapter and LLM settings and adapter, LoRA and added-row tensors, as Stage III with a
frozen S2T model leaves them) share their s2t runs.

Writes `OUT/results.md` (the table, also printed), `OUT/results.json` (every number, the
paths, the equivalent `echox eval` commands) and `OUT/results.png` (accuracy bars). A missing
input file stops it with one line naming the file and the command that makes it (exit 2);
missing `qa_espeak.jsonl` or `tts_units.jsonl` only skip their row.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from echox.config import int_at_least
from echox.eval.stats import paired_bootstrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUNDLES = ("echo", "gold")
LABELS = {"echo": "Echo", "gold": "Gold-unit baseline"}
ACCURACY_ROWS = (("text_accuracy", "Text LLM"), ("cascade_accuracy", "Cascade"),
                 ("s2t_accuracy", "S2T (piper)"),
                 ("s2s_accuracy", "S2S"), ("s2t_espeak_accuracy", "S2T (espeak-ng)"))


class Stop(Exception):
    """Ends the script with one line on stderr and exit status 2."""


# ----------------------------------------------------------------------------- small helpers


def read_items(path: Path) -> dict[str, dict[str, Any]]:
    """`items.jsonl` of a run as {id: record}; unreadable lines (an interrupted write) are skipped."""
    out: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():  # torn: skipped
            try:
                rec = json.loads(line)
                out[rec["id"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return out


# settings a run records only when they are not the default: absent on one side, present on
# the other is a difference too
# (SamplingConfig field, the option that sets it, its default): how the text answers decode
DECODING = (("repetition_penalty", "--repetition-penalty", 1.0), ("no_repeat_ngram_size", "--no-repeat-ngram", 0),
            ("num_beams", "--text-beams", 1), ("length_penalty", "--text-length-penalty", 1.0))
OPTIONAL_SETTINGS = tuple(name for name, _, _ in DECODING)
# settings older versions of this script did not record (the cascade run's question audio):
# absent from a run.json, they are taken as the current ones
RECORDED_LATER = ("audio",)


def check_run_dir(folder: Path, settings: dict[str, Any]) -> None:
    """A run folder keeps the settings it was made with (`run.json`); others are an error."""
    from echox.fileio import atomic_write_text, read_json_object

    path = folder / "run.json"
    if path.is_file():
        old = read_json_object(path, Stop)
        keys = [*settings, *(k for k in OPTIONAL_SETTINGS if k in old and k not in settings)]
        diff = {k: (old.get(k), settings.get(k)) for k in keys if old.get(k) != settings.get(k)
                and not (k in RECORDED_LATER and k not in old)}
        if diff:
            raise Stop(f"{folder} was made with other settings {diff} (old, new): delete it "
                       "or pass another --out")
        later = {k: settings[k] for k in RECORDED_LATER if k in settings and k not in old}
        if later:  # a run of an older version of this script: it records them from now on
            print(f"tiny_results: {folder} does not record {sorted(later)}; taken as this run's",
                  file=sys.stderr)
            atomic_write_text(path, json.dumps({**old, **later}, indent=2) + "\n")
        return
    folder.mkdir(parents=True, exist_ok=True)
    existing = len(read_items(folder / "items.jsonl"))
    atomic_write_text(path, json.dumps({**settings, "items_before_run_json": existing}, indent=2) + "\n")



def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def corpus_wer(refs: list[str], hyps: list[str]) -> float | None:
    """`echox.eval.wer.wer`, or None when the references hold no words."""
    from echox.eval.wer import normalize_words, wer

    if not any(normalize_words(r) for r in refs):
        return None
    return wer(refs, hyps)


@functools.lru_cache(maxsize=None)
def file_audio_digest(bench_file: Path) -> str:
    """`audio_digest` of every question of a benchmark file (not only the first --n: a smoke
    run's folder stays usable for the full run)."""
    from echox.eval.benchmarks import open_benchmark

    return audio_digest(open_benchmark(f"local:{bench_file}", decode_audio=False))


def audio_digest(items: Iterable[Any]) -> str:
    """A digest of the spoken questions' audio (`QAItem`s in order: id, each clip's bytes). piper's
    voice samples noise, so a rebuilt corpus speaks its test questions anew: two tables compare
    question by question only when they were measured on the same audio, the same digest."""
    from echox.model.checkpoint import sha256_file

    h = hashlib.sha256()
    for it in items:
        h.update(it.id.encode())
        h.update((sha256_file(Path(it.audio_path)) if it.audio_path else "-").encode())
    return h.hexdigest()[:16]


def folder_sha(folder: Path) -> str | None:
    from echox.model.checkpoint import sha256_file

    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def checkpoint_meta(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Stop(f"cannot read {folder / 'config.json'}: {e}") from e


def _hash_tensors(h: Any, folder: Path, pick: Callable[[list[str]], list[str]]) -> None:
    """Feed `h` the name, dtype, shape and bytes of the tensors `pick` chooses from the sorted
    keys of `folder`'s weights."""
    import torch
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for k in pick(sorted(f.keys())):
            t = f.get_tensor(k).contiguous()
            h.update(k.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def t2c_weights_sha(folder: Path) -> str:
    """Hash of a checkpoint's T2C tensors (`t2c.*`; `echo.*` when the T2C is the echo decoder)."""
    h = hashlib.sha256()
    _hash_tensors(h, folder, lambda keys: [k for k in keys if k.startswith("t2c.")]
                  or [k for k in keys if k.startswith("echo.")])
    return h.hexdigest()


def s2t_fingerprint(folder: Path) -> str:
    """Hash of everything a text answer depends on: the encoder, adapter and LLM settings and
    the adapter, LLM (LoRA) and added-row tensors. Two bundles with the same fingerprint give
    the same S2T answers, so their s2t runs are run once."""
    cfg = checkpoint_meta(folder).get("config", {})
    h = hashlib.sha256(json.dumps({k: cfg.get(k) for k in ("encoder", "adapter", "llm")},
                                  sort_keys=True).encode())
    _hash_tensors(h, folder, lambda keys: [k for k in keys
                                           if k.startswith(("adapter.", "llm.", "_added_rows"))])
    return h.hexdigest()


def fmt_pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


def fmt_pts(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:+.1f}"


def fmt_wer(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def fmt_ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}"


# ----------------------------------------------------------------------------- the runs


class Context:
    """Paths, options and the lazily loaded heavy parts (ASR, bundles)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.data = Path(args.data)
        self.progress = sys.stderr.isatty()
        self._asr: Any = None
        self._bundles: dict[Path, Any] = {}
        self.commands: dict[str, str] = {}
        self.runs: dict[str, str] = {}  # run name -> folder holding its items
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []

    def asr(self) -> Any:
        if self._asr is None:
            from echox.infer.asr import make_asr

            self._asr = make_asr(self.args.asr)
        return self._asr

    def asr_name(self) -> str:
        return self.args.asr

    def bundle(self, path: Path) -> Any:
        if path not in self._bundles:
            from echox.infer.bundle import load_bundle

            self._bundles[path] = load_bundle(path)
        return self._bundles[path]

    def release(self, path: Path) -> None:
        self._bundles.pop(path, None)


def eval_run(ctx: Context, name: str, mode: str, qa: Path, ids: list[str],
             settings: dict[str, Any], make_answerer: Callable[[], Any], command: str,
             batch_size: int) -> dict[str, dict[str, Any]]:
    """The records of `ids` in run folder OUT/name, answering the missing ones with run_eval."""
    from echox.eval.benchmarks import open_benchmark
    from echox.eval.run import run_eval

    folder = ctx.out / name
    check_run_dir(folder, settings)
    done = read_items(folder / "items.jsonl")
    todo = [i for i in ids if i not in done]
    if todo:
        spec = f"local:{qa}"
        bench = open_benchmark(spec, limit=len(ids), decode_audio=mode != "text")
        print(f"[{name}] answering {len(todo)} of {len(ids)} items", file=sys.stderr)
        run_eval(bench, make_answerer(), mode, folder, spec,
                 asr=ctx.asr() if mode == "s2s" else None, progress=ctx.progress,
                 total=len(bench), batch_size=batch_size)
        done = read_items(folder / "items.jsonl")
    else:
        print(f"[{name}] complete: reusing {folder / 'items.jsonl'}", file=sys.stderr)
    missing = [i for i in ids if i not in done]
    if missing:
        raise Stop(f"{folder / 'items.jsonl'}: no record for {missing[:3]} after the run")
    ctx.commands[name] = command
    ctx.runs[name] = str(folder)
    return {i: done[i] for i in ids}


def accuracy(recs: dict[str, dict[str, Any]]) -> float:
    return sum(bool(r["hit"]) for r in recs.values()) / max(len(recs), 1)


def t2c_run(ctx: Context, name: str, bundle_path: Path, source: Path, answers: list[dict[str, Any]],
            settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Answer text -> T2C units -> the bundle's vocoder -> ASR, per answer, resumable."""
    import numpy as np

    folder = ctx.out / name
    check_run_dir(folder, settings)
    path = folder / "items.jsonl"
    done = read_items(path)
    todo = [a for a in answers if a["id"] not in done]
    if todo:
        print(f"[{name}] voicing {len(todo)} of {len(answers)} answers through the T2C",
              file=sys.stderr)
        from echox.fileio import open_to_append
        from echox.infer.bundle import Bundle, check_bundle, set_unit_decoding
        from echox.model.echox import EchoX

        bundle = ctx.bundle(bundle_path)
        if source != bundle_path:  # a slim bundle: the T2C comes from another checkpoint,
            t2c = EchoX.from_pretrained(source).eval()  # decoding as the bundle does
            own = bundle.model.config.t2c
            set_unit_decoding(t2c, own.beams, own.length_penalty)
            bundle = Bundle(t2c, bundle.vocoder, bundle.unit_language, bundle.path)
            check_bundle(bundle)
        asr = ctx.asr()
        sr = bundle.vocoder.sample_rate
        with open_to_append(path) as f:
            # one answer at a time: in a batch the T2C's greedy unit budget is the longest
            # text's, so an answer that never stops would get more units than alone
            for a in todo:
                toks = bundle.model.units_from_text([a["text"]])[0]
                units = bundle.units(toks)
                audio = (np.asarray(bundle.vocoder.synthesize(units), dtype=np.float32)
                         if units else np.zeros(0, dtype=np.float32))
                rec = {"id": a["id"], "text": a["text"], "tokens": len(toks),
                       "units": len(units), "audio_seconds": audio.size / sr,
                       "transcript": asr.transcribe(audio, sr) if audio.size else ""}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                done[a["id"]] = rec
    else:
        print(f"[{name}] complete: reusing {path}", file=sys.stderr)
    ctx.runs[name] = str(folder)
    return {a["id"]: done[a["id"]] for a in answers}


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--echo", help="the EchoX bundle (echo-trained), e.g. runs/tiny/bundle-echo")
    ap.add_argument("--gold", help="the gold-unit baseline bundle, e.g. runs/tiny/bundle-gold")
    ap.add_argument("--data", default="data/tiny/test", help="the tiny corpus's test folder")
    ap.add_argument("--config", default="recipes/tiny/model.yaml",
                    help="preset or YAML naming the text LLM and its system prompt")
    ap.add_argument("--t2c", help="T2C checkpoint for bundles stored without one (slim), e.g. "
                                  "runs/tiny/t2c/model")
    ap.add_argument("--out", default="runs/tiny/results", help="output folder (runs go in it)")
    ap.add_argument("--n", type=int_at_least(1), help="first N questions only (a smoke run)")
    ap.add_argument("--batch-size", type=int_at_least(1), default=None,
                    help="text / s2t: questions answered together (default 16); s2s and "
                         "the T2C row go one at a time")
    ap.add_argument("--threads", type=int_at_least(0), default=0, help="torch and CTranslate2 threads (0 = default)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="s2t / s2s answer length cap")
    ap.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="text answers of every mode: CTRL repetition penalty (1 = off)")
    ap.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                    help="text answers of every mode: no N-gram twice in an answer (0 = off)")
    ap.add_argument("--text-beams", type=int, default=1, metavar="N",
                    help="text answers of every mode: beam search over N hypotheses (1 = greedy)")
    ap.add_argument("--text-length-penalty", type=float, default=1.0, metavar="A",
                    help="with --text-beams: a hypothesis scores its log-probability / length ** A")
    ap.add_argument("--asr", default="faster-whisper",
                    help="ASR of the spoken answers (default: Whisper tiny.en, faster-whisper)")
    ap.add_argument("--resamples", type=int_at_least(1), default=2000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--t2c-only", action="store_true",
                    help="only the T2C intelligibility row (e.g. right after Stage II, before "
                         "Stage I and III exist): writes t2c.json")
    args = ap.parse_args(argv)
    if args.n is not None and args.n < 1:
        ap.error("--n must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # CTranslate2 (faster-whisper) reads it
    from echox.errors import EchoXError

    try:
        return run(args, argv if argv is not None else sys.argv[1:])
    except Stop as e:
        print(f"tiny_results: {e}", file=sys.stderr)
        return 2
    except EchoXError as e:
        print(f"tiny_results: error: {e}", file=sys.stderr)
        return 2


def _need(path: Path, command: str) -> None:
    if not path.is_file():
        raise Stop(f"missing {path}: make it with `{command}`")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from echox.config import load_config
    from echox.eval.benchmarks import open_benchmark
    from echox.eval.run import (DEFAULT_BATCH_SIZE, CascadeAnswerer, S2SAnswerer, S2TAnswerer,
                                TextAnswerer)
    from echox.model.generation import SamplingConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = Context(args)
    data = ctx.data
    corpus = data.parent
    qa, qa_e = data / "qa.jsonl", data / "qa_espeak.jsonl"
    tts_units = data / "tts_units.jsonl"
    _need(qa, f"echox data build-tiny --out {corpus}")
    if not Path(args.config).exists() and args.config.endswith((".yaml", ".yml")):
        raise Stop(f"missing {args.config}: it is part of the repository (git checkout {args.config})")
    bundles: dict[str, Path] = {}
    for b in BUNDLES:
        p = getattr(args, b)
        if p:
            _need(Path(p) / "config.json",
                  f"STEP=bundle bash recipes/tiny/pipeline.sh  (echox bundle ... --out {p})")
            bundles[b] = Path(p).resolve()
    if args.t2c:
        _need(Path(args.t2c) / "config.json", "STEP=t2c bash recipes/tiny/pipeline.sh")
    batch = args.batch_size or DEFAULT_BATCH_SIZE
    lim = f" --limit {args.n}" if args.n else ""

    questions = list(open_benchmark(f"local:{qa}", limit=args.n, decode_audio=False))
    ids = [it.id for it in questions]
    if len(set(ids)) != len(ids):
        raise Stop(f"{qa}: question ids are not unique")
    espeak_ids = ([it.id for it in open_benchmark(f"local:{qa_e}", limit=args.n, decode_audio=False)]
                  if qa_e.is_file() else None)
    if espeak_ids is None:
        ctx.skipped["s2t_espeak_accuracy"] = (
            f"missing {qa_e}: make it with `echox data build-tiny --out {corpus}` "
            "(needs espeak-ng installed)")

    if args.t2c_only:
        return t2c_only(ctx, ids, tts_units, bundles, argv)

    # ---- decoding: greedy unless asked otherwise (beams, repetition guards); each setting is
    # recorded only when it is not the default, so runs made before it existed stay reusable
    try:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens,
                                  repetition_penalty=args.repetition_penalty,
                                  no_repeat_ngram_size=args.no_repeat_ngram,
                                  num_beams=args.text_beams, length_penalty=args.text_length_penalty)
    except ValueError as e:
        raise Stop(str(e)) from None
    guard: dict[str, Any] = {}
    guard_flags = ""
    for name, flag, default in DECODING:
        if getattr(sampling, name) != default:
            guard[name] = getattr(sampling, name)
            guard_flags += f" {flag} {guard[name]}"

    # ---- text LLM: the upper bound, the same for every bundle
    cfg = load_config(args.config)
    llm, prompt = cfg.llm.name_or_path, cfg.llm.system_prompt
    text_recs = eval_run(
        ctx, "text", "text", qa, ids,
        {"mode": "text", "benchmark": str(qa.resolve()), "llm": llm, "system_prompt": prompt, **guard},
        lambda: TextAnswerer(llm, prompt or None, decoding=sampling),
        f"echox eval --mode text --llm {shlex.quote(llm)} --system-prompt {shlex.quote(prompt or '')} "
        f"--benchmark local:{qa}{lim} --batch-size {batch}{guard_flags} --out {ctx.out / 'text'}", batch)
    text_acc = accuracy(text_recs)
    # ---- the cascade: the ASR hears the question, the same LLM answers (the same for every bundle)
    cascade_recs = eval_run(
        ctx, "cascade", "cascade", qa, ids,
        {"mode": "cascade", "benchmark": str(qa.resolve()), "llm": llm, "system_prompt": prompt,
         "asr": ctx.asr_name(), "audio": file_audio_digest(qa), **guard},  # the ASR hears the audio
        lambda: CascadeAnswerer(ctx.asr(), TextAnswerer(llm, prompt or None, decoding=sampling)),
        f"echox eval --mode cascade --asr {args.asr} --llm {shlex.quote(llm)} --system-prompt "
        f"{shlex.quote(prompt or '')} --benchmark local:{qa}{lim} --batch-size {batch}{guard_flags} "
        f"--out {ctx.out / 'cascade'}", batch)
    cascade_acc = accuracy(cascade_recs)

    # ---- per bundle
    shared: dict[tuple[Any, str], str] = {}  # (bundle or S2T fingerprint, run kind) -> who ran it
    t2c_shared: dict[str, str] = {}  # T2C fingerprint -> the bundle that ran it
    metrics: dict[str, dict[str, Any]] = {}
    per_item: dict[str, dict[str, dict[str, Any]]] = {}
    answers = None
    if tts_units.is_file():
        by_id = read_items(tts_units)
        answers = [{"id": i, "text": by_id[i]["text"]} for i in ids
                   if i in by_id and str(by_id[i].get("text") or "").strip()]
    else:
        ctx.skipped["t2c_wer"] = (
            f"missing {tts_units}: make it with `echox units extract --manifest {data}/tts.jsonl "
            f"--kmeans recipes/tiny/vocoder-k500/km500.joblib --out {tts_units}`")

    for b, path in bundles.items():
        m: dict[str, Any] = {"bundle": str(path), "text_accuracy": text_acc,
                             "cascade_accuracy": cascade_acc}
        recs: dict[str, dict[str, dict[str, Any]]] = {}
        kinds = [("s2t", "s2t", qa, ids), ("s2s", "s2s", qa, ids)]
        if espeak_ids is not None:
            kinds.append(("s2t-espeak", "s2t", qa_e, espeak_ids))
        s2t_key = s2t_fingerprint(path)
        for kind, mode, bench_file, kind_ids in kinds:
            # the text answers depend on the S2T part only: bundles that share it share the s2t runs
            owner = shared.setdefault((s2t_key if mode == "s2t" else path, kind), b)
            name = f"{owner}-{kind}"
            run_path = bundles[owner]  # the run is the owner's: its settings, its model
            settings = {"mode": mode, "benchmark": str(bench_file.resolve()), "model": str(run_path),
                        "max_new_tokens": args.max_new_tokens, **guard,
                        # a rebuilt corpus speaks its questions anew: its runs start afresh
                        "audio": file_audio_digest(bench_file)}
            if mode == "s2s":
                settings["asr"] = ctx.asr_name()
                make = lambda: S2SAnswerer(ctx.bundle(run_path), sampling=sampling)  # noqa: E731
            else:
                make = lambda: S2TAnswerer(ctx.bundle(run_path).model, sampling=sampling)  # noqa: E731
            bs = 1 if mode == "s2s" else batch
            common = f"--model {run_path} --max-new-tokens {args.max_new_tokens}{guard_flags}"
            cmd = (f"echox eval --mode {mode} {common} --benchmark local:{bench_file}{lim} "
                   f"--batch-size {bs} {'--asr ' + args.asr + ' ' if mode == 's2s' else ''}"
                   f"--out {ctx.out / name}")
            recs[kind] = eval_run(ctx, name, mode, bench_file, kind_ids, settings, make, cmd, bs)
            if owner != b:
                m.setdefault("shared_runs", {})[kind] = name
        m["s2t_accuracy"] = accuracy(recs["s2t"])
        m["s2s_accuracy"] = accuracy(recs["s2s"])
        m["s2t_espeak_accuracy"] = accuracy(recs["s2t-espeak"]) if "s2t-espeak" in recs else None
        m["gap"] = m["s2t_accuracy"] - m["s2s_accuracy"]
        s2s = [recs["s2s"][i] for i in ids]
        m["asr_wer"] = corpus_wer([r["text"] for r in s2s], [r.get("transcript", "") for r in s2s])
        if m["asr_wer"] is None:
            ctx.notes.append(f"{b}: ASR-WER undefined (the text answers hold no words)")
        lat = [r["stats"]["first_audio_ms"] for r in s2s
               if (r.get("stats") or {}).get("first_audio_ms") is not None]
        m["first_audio_ms"] = {"median": percentile(lat, 50), "p90": percentile(lat, 90),
                               "n": len(lat), "of": len(s2s)}
        if len(lat) < len(s2s):
            ctx.notes.append(f"{b}: {len(s2s) - len(lat)} of {len(s2s)} spoken answers had no "
                             "audio (no first-audio latency)")
        m["t2c_wer"] = None
        if answers is not None:
            m["t2c"] = t2c_for(ctx, b, path, answers, t2c_shared)
            m["t2c_wer"] = m["t2c"].get("wer")
        metrics[b] = m
        per_item[b] = {i: {"s2t": bool(recs["s2t"][i]["hit"]), "s2s": bool(recs["s2s"][i]["hit"])}
                       for i in ids}
        ctx.release(path)

    boot = None
    if len(bundles) == 2:
        diffs = [(per_item["echo"][i]["s2t"] - per_item["echo"][i]["s2s"])
                 - (per_item["gold"][i]["s2t"] - per_item["gold"][i]["s2s"]) for i in ids]
        boot = paired_bootstrap(diffs, args.resamples, args.seed)
    for b in bundles:
        g = [per_item[b][i]["s2t"] - per_item[b][i]["s2s"] for i in ids]
        metrics[b]["gap_ci"] = paired_bootstrap(g, args.resamples, args.seed)

    result = {
        "n": len(ids), "n_espeak": len(espeak_ids) if espeak_ids is not None else None,
        "data": str(data), "test_audio": audio_digest(questions), "benchmarks": {"piper": str(qa), "espeak": str(qa_e),
                                          "tts_units": str(tts_units)},
        "config": args.config, "llm": llm, "system_prompt": prompt, "asr": args.asr,
        "max_new_tokens": args.max_new_tokens, **guard, "batch_size": batch,
        "threads": args.threads,
        "t2c_checkpoint": args.t2c, "bundles": {b: str(p) for b, p in bundles.items()},
        "text_accuracy": text_acc, "cascade_accuracy": cascade_acc, "metrics": metrics, "gap_difference": boot,
        "runs": ctx.runs, "commands": {"this": shlex.join(["python", "bench/tiny_results.py", *argv]),
                                       **ctx.commands},
        "skipped": ctx.skipped, "notes": ctx.notes,
    }
    table = render_table(result)
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "results.md").write_text(table)
    (ctx.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, ctx.out / "results.png")
    print(table, end="")
    print(f"\nwrote {ctx.out / 'results.md'}, {ctx.out / 'results.json'}, {ctx.out / 'results.png'}")
    return 0


def t2c_only(ctx: Context, ids: list[str], tts_units: Path, bundles: dict[str, Path],
             argv: list[str]) -> int:
    """`--t2c-only`: the T2C intelligibility WER of each bundle, nothing else."""
    _need(tts_units, f"echox units extract --manifest {ctx.data}/tts.jsonl "
                     f"--kmeans recipes/tiny/vocoder-k500/km500.joblib --out {tts_units}")
    by_id = read_items(tts_units)
    answers = [{"id": i, "text": by_id[i]["text"]} for i in ids
               if i in by_id and str(by_id[i].get("text") or "").strip()]
    shared: dict[str, str] = {}
    rows = {b: t2c_for(ctx, b, path, answers, shared) for b, path in bundles.items()}
    result = {"t2c": rows, "skipped": ctx.skipped, "runs": ctx.runs,
              "command": shlex.join(["python", "bench/tiny_results.py", *argv])}
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "t2c.json").write_text(json.dumps(result, indent=2) + "\n")
    for b, r in rows.items():
        print(f"{b}: T2C intelligibility WER {fmt_wer(r.get('wer'))} over {r.get('n', 0)} answers"
              + (f" (skipped: {r['skipped']})" if "skipped" in r else ""))
    return 0


def t2c_for(ctx: Context, b: str, path: Path, answers: list[dict[str, Any]],
            t2c_shared: dict[str, str]) -> dict[str, Any]:
    """The T2C intelligibility WER of one bundle (or the note why it is skipped)."""
    meta = checkpoint_meta(path)
    if "t2c" in (meta.get("omitted_parts") or []):
        if not ctx.args.t2c:
            reason = (f"{path} is slim (no T2C stored): pass --t2c with the Stage II checkpoint, "
                      "e.g. --t2c runs/tiny/t2c/model (STEP=t2c bash recipes/tiny/pipeline.sh)")
            ctx.skipped[f"t2c_wer:{b}"] = reason
            return {"skipped": reason}
        source = Path(ctx.args.t2c).resolve()
    else:
        source = path
    if not (path / "vocoder").is_dir():
        reason = f"{path} has no vocoder/"
        ctx.skipped[f"t2c_wer:{b}"] = reason
        return {"skipped": reason}
    src_meta = checkpoint_meta(source)
    # the bundle's unit decoding (greedy runs keep their old fingerprint)
    t2c_cfg = (meta.get("config") or {}).get("t2c") or {}
    beams, penalty = int(t2c_cfg.get("beams", 1)), float(t2c_cfg.get("length_penalty", 1.0))
    parts = [t2c_weights_sha(source), str(folder_sha(path / "vocoder")),
             str(folder_sha(path / "unit_language"))]
    if beams > 1:
        parts.append(f"beams={beams},length_penalty={penalty}")
    fp = hashlib.sha256("|".join(parts).encode()).hexdigest()
    owner = t2c_shared.setdefault(fp, b)
    name = f"{owner}-t2c"
    settings = {"mode": "t2c", "t2c_fingerprint": fp, "asr": ctx.asr_name()}
    recs = t2c_run(ctx, name, path, source, answers, settings)
    refs = [recs[a["id"]]["text"] for a in answers]
    hyps = [recs[a["id"]]["transcript"] for a in answers]
    out = {"wer": corpus_wer(refs, hyps) if answers else None, "n": len(answers),
           "source": str(source), "fingerprint": fp, "run": str(ctx.out / name), "beams": beams,
           "t2c_trained": "t2c" in (src_meta.get("trained_stages") or []),
           "audio_seconds": sum(recs[a["id"]]["audio_seconds"] for a in answers)}
    if owner != b:
        out["same_as"] = owner
    if not out["t2c_trained"]:
        ctx.notes.append(f"{b}: the T2C of {source} was never trained (stage t2c not recorded)")
    return out


# ----------------------------------------------------------------------------- outputs


def _cells(result: dict[str, Any], get: Callable[[dict[str, Any]], str]) -> list[str]:
    return [get(result["metrics"][b]) for b in result["metrics"]]


def _decoding(result: dict[str, Any]) -> str:
    """How the text answers were decoded, in words."""
    guards = []
    beams = result.get("num_beams", 1)
    if result.get("length_penalty", 1.0) != 1.0:
        guards.append(f"length penalty {result['length_penalty']}")
    if result.get("repetition_penalty", 1.0) != 1.0:
        guards.append(f"repetition penalty {result['repetition_penalty']}")
    if result.get("no_repeat_ngram_size"):
        guards.append(f"no repeated {result['no_repeat_ngram_size']}-gram")
    how = f"text by beam search over {beams}" if beams > 1 else "greedy text"
    return how + (", " + ", ".join(guards) if guards else "")


def render_table(result: dict[str, Any]) -> str:
    bundles = list(result["metrics"])
    skipped = result["skipped"]
    asr = "Whisper tiny.en" if result["asr"] == "faster-whisper" else result["asr"]
    head = [LABELS[b] for b in bundles] if bundles else ["(no bundle)"]
    lines = [f"EchoX-Tiny on the first {result['n']} test questions of `{result['data']}` "
             f"(text LLM: {result['llm']}; spoken answers scored with {asr}; question audio "
             f"{result.get('test_audio', '?')}; {_decoding(result)})", "",
             "| | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]

    def row(label: str, cells: Iterable[str]) -> None:
        cells = list(cells) or ["—"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def skip_or(key: str, b: str, text: str) -> str:
        return "skipped" if (key in skipped or f"{key}:{b}" in skipped) else text

    row("Text-LLM accuracy (upper bound)",
        [fmt_pct(result["text_accuracy"])] * max(len(bundles), 1))
    row(f"Cascade accuracy ({asr} hears the question, the text LLM answers)",
        [fmt_pct(result["cascade_accuracy"])] * max(len(bundles), 1))
    row("S2T accuracy (piper voice)", _cells(result, lambda m: fmt_pct(m["s2t_accuracy"])))
    row(f"S2S accuracy (speech → {asr})", _cells(result, lambda m: fmt_pct(m["s2s_accuracy"])))
    row("S2T accuracy (espeak-ng en-us voice)",
        [skip_or("s2t_espeak_accuracy", b, fmt_pct(result["metrics"][b]["s2t_espeak_accuracy"]))
         for b in bundles])
    row("S2T − S2S gap (points)", _cells(result, lambda m: fmt_pts(m["gap"])))
    row("ASR-WER (spoken answer vs its own text)", _cells(result, lambda m: fmt_wer(m["asr_wer"])))
    row("T2C intelligibility WER (answer text → T2C → vocoder → ASR)",
        [skip_or("t2c_wer", b, fmt_wer(result["metrics"][b]["t2c_wer"])) for b in bundles])
    row("First-audio latency, median (ms)",
        _cells(result, lambda m: fmt_ms(m["first_audio_ms"]["median"])))
    row("First-audio latency, p90 (ms)", _cells(result, lambda m: fmt_ms(m["first_audio_ms"]["p90"])))
    boot = result["gap_difference"]
    if boot is not None:
        row(f"Gap Echo − Gold, paired bootstrap {100 * boot['level']:.0f} % CI (points)",
            [f"{fmt_pts(boot['mean'])} [{fmt_pts(boot['lo'])}, {fmt_pts(boot['hi'])}]"]
            + [""] * (len(bundles) - 1))
    else:
        row("Gap Echo − Gold, paired bootstrap 95 % CI (points)",
            ["n/a (needs --echo and --gold)"] + [""] * (len(bundles) - 1))
    lines.append("")
    for b in bundles:
        t2c = result["metrics"][b].get("t2c") or {}
        if t2c.get("same_as"):
            lines.append(f"- {LABELS[b]}: same T2C, unit language and vocoder as "
                         f"{LABELS[t2c['same_as']]}; its T2C WER is that run's.")
        shared = result["metrics"][b].get("shared_runs")
        if shared:
            lines.append(f"- {LABELS[b]}: the same S2T weights (or bundle) as another column, so the "
                         f"text answers are the same; its runs are that column's "
                         f"({', '.join(sorted(shared.values()))}).")
    for key, why in result["skipped"].items():
        lines.append(f"- skipped {key}: {why}")
    for note in result["notes"]:
        lines.append(f"- note: {note}")
    if boot is not None:
        lines.append(f"- bootstrap: {boot['resamples']} resamples of the {boot['n']} questions, "
                     f"seed {boot['seed']}; per question gap = s2t hit − s2s hit.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bundles = list(result["metrics"]) or ["text"]
    x = np.arange(len(ACCURACY_ROWS))
    width = 0.8 / len(bundles)
    fig, ax = plt.subplots(figsize=(8, 4))
    for k, b in enumerate(bundles):
        m = result["metrics"].get(b, {"text_accuracy": result["text_accuracy"],
                                      "cascade_accuracy": result["cascade_accuracy"]})
        vals = [m.get(key) for key, _ in ACCURACY_ROWS]  # None: skipped
        bars = ax.bar(x + (k - (len(bundles) - 1) / 2) * width,
                      [0.0 if v is None else 100 * v for v in vals], width,
                      label=LABELS.get(b, "text LLM"))
        ax.bar_label(bars, labels=["skipped" if v is None else f"{100 * v:.1f}" for v in vals],
                     fontsize=8)
    ax.set_xticks(x, [label for _, label in ACCURACY_ROWS])
    ax.set_ylim(0, 118)  # room for the labels and the legend above 100 %
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"EchoX-Tiny, {result['n']} test questions")
    ax.legend(loc="upper right", ncol=len(bundles), fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
