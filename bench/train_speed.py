"""Training speed of each EchoX stage on the real `tiny` model, with and without the fast settings.

    python bench/train_speed.py --dialogues data/tiny/train/dialogues.jsonl \
        --tts data/tiny/train/tts_units.jsonl --threads 1 2 --n 64
    python bench/train_speed.py --curve 200 --threads 2      # fp32 vs bf16 loss curves (S2T)

For each torch thread count, stage (S2T, T2C, Echo) and variant, one trainer makes `--warmup`
untimed forward/backward passes, then trains one timed epoch over the first `--n` examples
(or `--steps` steps), in this process: every variant sees the same examples. The first row of
a stage is today's defaults (fp32, encoder run every step, random batches, the preset's
system prompt); the others add one setting each, and `fast` adds them all:

- `cache`    train.cache_encoder: frozen Whisper outputs read from a disk cache, filled
             before timing (the fill is timed apart: `fill_s`);
- `bf16`     train.precision: bf16 (autocast; weights and optimizer stay fp32);
- `group`    train.group_by_length: batches of similar length;
- `prompt`   the short system prompt of the tiny recipes (`--short-prompt`);
- `share`    train.share_prompt: the tokens every row starts with (system prompt, chat
             template) run once per batch, their KV cache shared (on in every row below;
             the rows above, `defaults` included, turn it off);
- `ctc`      (S2T only) `fast` with train.ctc_only: the adapter on the CTC loss alone, the
             LLM never runs (its loss column is the CTC loss, and its tokens are not run);
- `ctc-vocab` the same with train.ctc_vocab: transcripts (the CTC softmax over the token
             ids of the timed examples' transcripts, or of `--ctc-vocab-data`'s, instead of
             the whole vocabulary);
- `fast-vocab` (S2T only) `fast` with train.ctc_vocab: transcripts (whole Stage I steps);
  `fast-vocab-noshare` the same without train.share_prompt; `fast-eager` the same with
  train.llm_attention: eager, for S2T and Echo (an Echo run starts from a Stage I model
  that carries the restricted CTC head, so its joint L_S2T uses it too); `eager` is `fast`
  with eager attention (S2T and Echo).

Echo is timed on gold units of each answer (the baseline target, same shapes as offline
pseudo-labels) so that no T2C decode runs inside the timing. Columns: examples/s, tokens/s
(LLM input tokens for S2T/Echo; text + unit tokens for T2C), the speed-up over the stage's
defaults at the same thread count, and the mean loss of the timed steps (runs that see the
same batches should agree). `--json` keeps every row.

`--curve N` instead trains S2T for N steps in fp32 and in bf16 (both with the cache and the
grouped batches) and prints both loss curves, averaged over windows, and their difference.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from echox.config import int_at_least
from echox.fileio import atomic_write_text, check_out_path

SHORT_PROMPT = "Answer in one short sentence."
NO_SHARE = {"share_prompt": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {**NO_SHARE},
    "cache": {"cache_encoder": True, **NO_SHARE},
    "bf16": {"precision": "bf16", **NO_SHARE},
    "group": {"group_by_length": True, **NO_SHARE},
    "prompt": {"prompt": SHORT_PROMPT, **NO_SHARE},
    # train.share_prompt: the tokens all rows start with run once per batch
    "share": {},
    "fast": {"cache_encoder": True, "precision": "bf16", "group_by_length": True, "prompt": SHORT_PROMPT},
    # `fast` with train.llm_attention: eager (S2T and Echo)
    "eager": {"cache_encoder": True, "precision": "bf16", "group_by_length": True, "prompt": SHORT_PROMPT,
              "llm_attention": "eager"},
    # S2T only: `fast` on the CTC loss alone (train.ctc_only), over the whole vocabulary and
    # over the training transcripts' token ids (train.ctc_vocab: transcripts)
    "fast-vocab": {"cache_encoder": True, "precision": "bf16", "group_by_length": True,
                   "prompt": SHORT_PROMPT, "ctc_vocab": "transcripts"},
    # `fast-vocab` with train.llm_attention: eager (plain matmul attention while training)
    "fast-eager": {"cache_encoder": True, "precision": "bf16", "group_by_length": True,
                   "prompt": SHORT_PROMPT, "ctc_vocab": "transcripts", "llm_attention": "eager"},
    # `fast-eager` without LoRA dropout (model override llm.lora.dropout=0): peft then skips
    # the dropout masks, which were 5.7 % of a profiled Stage I step
    "fast-eager-nodrop": {"cache_encoder": True, "precision": "bf16", "group_by_length": True,
                          "prompt": SHORT_PROMPT, "ctc_vocab": "transcripts", "llm_attention": "eager",
                          "model_set": ("llm.lora.dropout=0.0",)},
    # the same without train.share_prompt (what `fast-vocab` was before it)
    "fast-vocab-noshare": {"cache_encoder": True, "precision": "bf16", "group_by_length": True,
                           "prompt": SHORT_PROMPT, "ctc_vocab": "transcripts", **NO_SHARE},
    "ctc": {"cache_encoder": True, "precision": "bf16", "group_by_length": True, "prompt": SHORT_PROMPT,
            "ctc_only": True},
    "ctc-vocab": {"cache_encoder": True, "precision": "bf16", "group_by_length": True,
                  "prompt": SHORT_PROMPT, "ctc_only": True, "ctc_vocab": "transcripts"},
    # Echo only: `fast` with the S2T model frozen (train.freeze_s2t): its response states are
    # computed once (the fill column) and a step trains the denoiser and echo decoder alone
    "frozen": {"cache_encoder": True, "precision": "bf16", "group_by_length": True,
               "prompt": SHORT_PROMPT, "freeze_s2t": True},
}
S2T_ONLY = ("fast-vocab", "fast-vocab-noshare", "ctc", "ctc-vocab")
ECHO_ONLY = ("frozen",)
T2C_VARIANTS = ("defaults", "bf16", "group", "fast")


@dataclass
class Row:
    threads: int
    stage: str
    variant: str
    batch_size: int
    steps: int
    seconds: float
    examples_per_s: float
    tokens_per_s: float
    speedup: float
    mean_loss: float
    fill_s: float | None = None


class Counting:
    """Wraps a collate function and counts examples and tokens of the batches it makes."""

    def __init__(self, collate: Any, stage: str) -> None:
        self.collate, self.stage = collate, stage
        self.examples = self.tokens = 0

    def __call__(self, items: list[Any]) -> Any:
        batch = self.collate(items)
        self.examples += len(items)
        if self.stage == "t2c":
            self.tokens += sum(len(t) for t in batch.text_ids) + sum(len(u) for u in batch.units)
        else:
            self.tokens += int(batch.attention_mask.sum())
        return batch


def _model(stage: str, prompt: str | None, cache: dict[str, Any], config: str = "recipes/tiny/model.yaml",
           model_set: tuple[str, ...] = ()) -> Any:
    """A fresh tiny model for a stage (base weights loaded once, deep-copied per run)."""
    from echox.config import DEFAULT_SYSTEM_PROMPT, load_config
    from echox.model.echox import EchoX
    from echox.train import stages

    # Without `prompt`, the preset's long system prompt: today's defaults, even where the
    # model file (recipes/tiny/model.yaml) already sets the short one.
    text = prompt or DEFAULT_SYSTEM_PROMPT
    key = (text, *model_set)
    if key not in cache:
        cache[key] = EchoX.build(load_config(config, [f'llm.system_prompt="{text}"', *model_set]))
    model = copy.deepcopy(cache[key])
    if stage == "echo":
        model.init_echo_from_t2c()
    stages.apply_stage(model, stage)
    return model


def _data(stage: str, model: Any, args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    from echox.data.manifest import read_jsonl  # noqa: I001 (manifest before datasets: import loop)
    from echox.data.datasets import S2TDataset, T2CDataset, collate_t2c_examples, make_s2t_collator
    from echox.train import stages
    from echox.train.run import EchoDataset, _unit_language

    lang = _unit_language(args.unit_language, model.t2c.num_units)
    encode = lang.encode if lang is not None else None
    if stage == "t2c":
        recs = read_jsonl(args.tts, "tts", on_error="skip").records[: args.n]
        return T2CDataset(recs, model.tokenizer, encode), collate_t2c_examples, {}
    rep = read_jsonl(args.dialogues, "dialogue", on_error="skip")
    recs = rep.records[: args.n]
    if stage == "s2t":
        ds = S2TDataset(recs, rep.base_dir, max_audio_seconds=model.config.encoder.max_seconds)
        return ds, make_s2t_collator(model.prompt, model.tokenizer, units="ignore"), {}
    units = {r.id: r.units for r in read_jsonl(args.tts, "tts", on_error="skip").records}
    for r in recs:  # gold units: the answer's own audio, else (a partial corpus) the question's
        u = units.get(r.id) or units.get(f"{r.id}-q")
        if u is None:
            raise SystemExit(f"{args.tts}: no units for dialogue {r.id}")
        for m in r.conversations:
            if m.role == "assistant":
                m.units = u
    base = S2TDataset(recs, rep.base_dir, max_audio_seconds=model.config.encoder.max_seconds)
    return EchoDataset(base, None, gold=True, encode=encode), stages.echo_collator(model), {"cut": False}


def _fill_cache(model: Any, data: Any, root: Path) -> float:
    """Encode every clip of the dataset once into the cache; seconds taken."""
    model.enable_feature_cache(root)
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(data), 16):
            audio = [t.audio for i in range(s, min(s + 16, len(data)))
                     for t in data[i].turns if t.audio is not None]
            model._cached_frames(audio)
    return time.perf_counter() - t0


def run_one(stage: str, variant: str, threads: int, args: argparse.Namespace, models: dict[str, Any],
            tmp: Path, steps: int | None = None, log_every: int = 10_000) -> tuple[Row, Any]:
    from echox.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(threads)
    opts = dict(VARIANTS[variant])
    prompt = opts.pop("prompt", None)
    model_set = tuple(opts.pop("model_set", ()))
    if stage == "t2c":  # no speech input and no prompt: the T2C reads text embeddings only
        opts.pop("cache_encoder", None)
        prompt = None
    model = _model(stage, prompt, models, args.model, model_set)
    data, collate, kwargs = _data(stage, model, args)
    if opts.get("ctc_only"):
        kwargs = {**kwargs, "ctc_only": True}
    if opts.get("ctc_vocab") == "transcripts":
        from echox.train.run import _dialogues, restrict_ctc_to_transcripts

        # the columns of a whole corpus (--ctc-vocab-data), or of the timed examples (Echo's
        # examples carry no transcripts: those of the --dialogues file)
        if args.ctc_vocab_data or stage == "echo":
            vocab_data = _dialogues(args.ctc_vocab_data or [args.dialogues], None,
                                    model.config.encoder.max_seconds)
        else:
            vocab_data = data
        restrict_ctc_to_transcripts(model, vocab_data)
    fill = None
    if opts.get("cache_encoder"):
        fill = _fill_cache(model, data, tmp / "cache")
    if opts.get("freeze_s2t"):
        from echox.train import stages

        stages.apply_stage(model, stage, freeze_s2t=True)
        t0 = time.perf_counter()
        data.states = stages.precompute_states(model, [data[i].turns for i in range(len(data))],
                                               tmp / f"states-{threads}")
        fill = (fill or 0.0) + time.perf_counter() - t0
    out = tmp / f"{stage}-{variant}-{threads}"
    per_epoch = len(data) // args.batch_size
    steps = steps or args.steps or per_epoch
    cfg = TrainConfig(stage=stage, output_dir=str(out), max_steps=steps + 1,
                      batch_size=args.batch_size, lr=args.lr, warmup_steps=5, threads=threads,
                      log_every=log_every, seed=0, encoder_cache_dir=str(tmp / "cache"), **opts)
    counter = Counting(collate, stage)
    trainer = Trainer(model, cfg, data, counter, step_kwargs=kwargs)
    # Untimed warm-up passes (kernels, allocator) on the first examples, no optimizer step:
    # the timed steps then cover the same examples in every variant (one whole epoch by
    # default), whatever order the variant's batches come in.
    for _ in range(args.warmup):
        batch = collate([data[i] for i in range(args.batch_size)]).to(trainer.acc.device)
        with trainer.acc.autocast():
            trainer.model(batch, task=stage, **kwargs).loss.backward()
        trainer.opt.zero_grad()
    t0 = time.perf_counter()
    trainer.train(stop_at=steps)
    dt = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").is_file() else []
    losses = [r["loss"] for r in recs if "loss" in r]
    row = Row(threads, stage, variant, args.batch_size, steps, dt, counter.examples / dt,
              counter.tokens / dt, 1.0, sum(losses) / max(len(losses), 1), fill)
    return row, out


def print_table(rows: list[Row]) -> None:
    print(f"{'threads':>7} {'stage':<5} {'variant':<9} {'ex/s':>7} {'tok/s':>8} {'speed-up':>8} "
          f"{'loss':>7} {'fill_s':>7}")
    for r in rows:
        fill = f"{r.fill_s:7.1f}" if r.fill_s is not None else f"{'':>7}"
        # no defaults row in this run (--variants without it): no ratio to show
        speed = f"{r.speedup:.2f}x" if r.speedup == r.speedup else "-"
        print(f"{r.threads:>7} {r.stage:<5} {r.variant:<9} {r.examples_per_s:7.2f} "
              f"{r.tokens_per_s:8.0f} {speed:>8} {r.mean_loss:7.3f} {fill}")


def curve(args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    """S2T loss curves over the same batches, one per precision in `--precisions`."""
    models: dict[str, Any] = {}
    curves: dict[str, list[float]] = {}
    for prec in args.precisions:
        VARIANTS[f"curve-{prec}"] = {"cache_encoder": True, "group_by_length": True,
                                     "precision": prec, "prompt": SHORT_PROMPT}
        row, out = run_one("s2t", f"curve-{prec}", args.threads[0], args, models, tmp,
                           steps=args.curve, log_every=1)
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        curves[prec] = [r["loss"] for r in recs if "loss" in r]
        print(f"{prec}: {row.seconds:.0f} s, {row.examples_per_s:.2f} examples/s", flush=True)
    return curves


def show_curves(curves: dict[str, list[float]], windows: int = 10) -> None:
    """Both curves averaged over `windows` windows, and bf16's difference to fp32."""
    a_all, b_all = curves["fp32"], curves["bf16"]
    n = min(len(a_all), len(b_all))
    w = max(1, n // windows)
    print(f"{'steps':>9} {'fp32':>7} {'bf16':>7} {'diff':>7}")
    for s in range(0, n - n % w if n >= w else n, w):
        a, b = sum(a_all[s:s + w]) / w, sum(b_all[s:s + w]) / w
        print(f"{s + 1:>4}-{s + w:<4} {a:7.3f} {b:7.3f} {100 * (b - a) / a:+6.1f}%")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="recipes/tiny/model.yaml", help="model config (preset or YAML)")
    p.add_argument("--dialogues", default="data/tiny/train/dialogues.jsonl")
    p.add_argument("--tts", default="data/tiny/train/tts_units.jsonl", help="TTS JSONL with units")
    p.add_argument("--unit-language", help="unit-language folder for T2C/Echo targets (default raw units)")
    p.add_argument("--n", type=int_at_least(1), default=256, help="examples of each manifest to use")
    p.add_argument("--stages", nargs="+", default=["s2t", "t2c", "echo"], choices=["s2t", "t2c", "echo"])
    p.add_argument("--ctc-vocab-data", nargs="+", default=None, metavar="JSONL",
                   help="dialogue manifests whose transcripts give the CTC columns of the "
                        "*-vocab variants (default: the timed examples' transcripts)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", nargs="+", type=int_at_least(1), default=[1, 2])
    p.add_argument("--steps", type=int_at_least(0), default=0,
                   help="timed steps per run (default: one epoch of the --n examples, so that every "
                        "variant trains on the same examples)")
    p.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed forward/backward passes first")
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--curve", type=int_at_least(0), default=0, help="S2T fp32 vs bf16 loss curves over N steps")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="--curve: the precisions to run (run them in two processes and merge the "
                        "--json files with --show-curves)")
    p.add_argument("--show-curves", nargs="+", metavar="JSON", help="print the curves of earlier --json files")
    p.add_argument("--json", help="write the rows (or curves) here")
    args = p.parse_args(argv)
    if not 0 < args.lr < math.inf:
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.batch_size > args.n and not args.show_curves:
        p.error(f"--batch-size ({args.batch_size}) must be <= --n ({args.n})")
    if args.json:  # before the run: a bad path would lose its results, an input be replaced
        check_out_path(args.json, "--json", folder=False,
                       inputs=[args.model, args.dialogues, args.tts, *(args.ctc_vocab_data or []),
                               *(args.show_curves or [])])
    with tempfile.TemporaryDirectory(prefix="train_speed-") as t:
        tmp = Path(t)
        if args.show_curves:
            merged: dict[str, list[float]] = {}
            for f in args.show_curves:
                merged.update(json.loads(Path(f).read_text()))
            if not {"fp32", "bf16"} <= set(merged):
                raise SystemExit(f"--show-curves: need fp32 and bf16 curves, got {sorted(merged)}")
            show_curves(merged)
            return 0
        from echox.model.precision import cpu_has_fast_bf16

        if not torch.cuda.is_available() and not cpu_has_fast_bf16():
            print("note: this CPU has no native bfloat16, so precision bf16 runs in fp32 here "
                  "(echox.train.trainer.effective_precision)", flush=True)
        if args.curve:
            curves = curve(args, tmp)
            if args.json:
                atomic_write_text(args.json, json.dumps(curves))
            if {"fp32", "bf16"} <= set(curves):
                show_curves(curves)
            return 0
        rows: list[Row] = []
        models: dict[str, Any] = {}
        for threads in args.threads:
            for stage in args.stages:
                base = None
                for variant in args.variants:
                    if (stage != "s2t" and variant in S2T_ONLY) or (stage != "echo" and variant in ECHO_ONLY):
                        continue
                    if stage == "t2c" and variant not in T2C_VARIANTS:
                        continue
                    row, _ = run_one(stage, variant, threads, args, models, tmp)
                    if variant == "defaults":
                        base = row.examples_per_s
                    row.speedup = row.examples_per_s / base if base else float("nan")
                    rows.append(row)
                    print(f"  {threads}t {stage} {variant}: {row.examples_per_s:.2f} ex/s", file=sys.stderr, flush=True)
        print_table(rows)
        if args.json:
            atomic_write_text(args.json, json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
