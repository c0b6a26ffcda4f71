"""Batched `echox eval`: items per minute of text and s2t mode at batch size 1 against N.

    python bench/eval_speed.py [--benchmark local:data/tiny/test/qa.jsonl] [--n 32]
                               [--batch-size 16] [--threads 1] [--modes text,s2t]

Text mode asks the config's LLM (`--config tiny`: SmolLM2-135M-Instruct) the question text;
s2t mode asks the EchoX bundle (`--model`, default: the bundle `echox eval` uses, the
embedded tiny model when nothing else is installed) the spoken question. Each mode answers
the first `--n` items of the benchmark twice, one at a time and `--batch-size` at a time,
greedily and with the answerers of `echox eval`, after one untimed warm-up item. The table
gives seconds, items per minute, the speed-up over batch size 1 and whether every batched
answer is token-identical to the one the question got alone.

Without the default benchmark file (before `echox data build-tiny`), text mode takes its
questions from recipes/tiny/questions.jsonl and s2t mode is skipped; a benchmark given that
cannot be read is an error. On a CPU shared with other work keep `--threads` at the free cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echox.config import int_at_least

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Row:
    mode: str
    batch_size: int
    items: int
    seconds: float
    speedup: float
    identical: bool

    @property
    def per_minute(self) -> float:
        return 60 * self.items / self.seconds if self.seconds > 0 else float("inf")


def benchmark_items(spec: str, n: int, audio: bool) -> list[Any]:
    """The first `n` items of a benchmark (audio decoded when `audio`)."""
    from echox.eval.benchmarks import open_benchmark

    return list(open_benchmark(spec, limit=n, decode_audio=audio))


def recipe_questions(n: int) -> list[Any]:
    """The first `n` questions of the tiny recipe as text-only items (no audio)."""
    from echox.data.tiny_corpus import load_questions
    from echox.eval.benchmarks import QAItem

    return [QAItem(q.id, q.question, list(q.answers), None, None, None)
            for q in load_questions()[:n]]


def answer_all(answerer: Any, items: Sequence[Any], batch_size: int) -> tuple[float, list[Any]]:
    """Seconds to answer every item `batch_size` at a time, and the answers in order."""
    answers: list[Any] = []
    t0 = time.perf_counter()
    for i in range(0, len(items), batch_size):
        answers += answerer.answer_batch(items[i:i + batch_size])
    return time.perf_counter() - t0, answers


def same_answers(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Every answer has the same tokens and text in both lists."""
    return len(a) == len(b) and all(x.token_ids == y.token_ids and x.text == y.text
                                    for x, y in zip(a, b))


def measure(mode: str, answerer: Any, items: Sequence[Any], batch_size: int) -> list[Row]:
    """Rows for batch size 1 and `batch_size` (the first is the reference)."""
    answerer.answer_batch(items[:1])  # warm-up: lazy initialisation, first-call allocations
    base_s, base = answer_all(answerer, items, 1)
    rows = [Row(mode, 1, len(items), base_s, 1.0, True)]
    if batch_size > 1:
        sec, answers = answer_all(answerer, items, batch_size)
        rows.append(Row(mode, batch_size, len(items), sec, base_s / sec if sec > 0 else 0.0,
                        same_answers(answers, base)))
    return rows


def print_table(rows: Sequence[Row]) -> None:
    print("| mode | batch size | items | seconds | items/min | speed-up | answers identical |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.mode} | {r.batch_size} | {r.items} | {r.seconds:.1f} | {r.per_minute:.1f} | "
              f"{r.speedup:.2f}x | {'y' if r.identical else 'n'} |")


DEFAULT_BENCHMARK = "local:data/tiny/test/qa.jsonl"


def _default_missing(args: argparse.Namespace) -> bool:
    """The default benchmark, not made yet (`echox data build-tiny`): the fallbacks apply.
    A benchmark given, or the default one damaged, is read and its errors reported."""
    return args.benchmark == DEFAULT_BENCHMARK and not Path(DEFAULT_BENCHMARK[len("local:"):]).exists()


def text_rows(args: argparse.Namespace) -> list[Row]:
    from echox.config import load_config
    from echox.eval.run import TextAnswerer

    if _default_missing(args):
        print(f"text: no {DEFAULT_BENCHMARK[len('local:'):]}; using the questions of "
              "recipes/tiny/questions.jsonl")
        items = recipe_questions(args.n)
    else:  # one given, or the default there: its errors are errors (they fell back, exit 0)
        items = benchmark_items(args.benchmark, args.n, audio=False)
    llm = args.llm or load_config(args.config).llm.name_or_path
    kw = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    return measure("text", TextAnswerer(llm, args.system_prompt or None, **kw), items,
                   args.batch_size)


def s2t_rows(args: argparse.Namespace) -> list[Row]:
    from echox.eval.run import S2TAnswerer
    from echox.infer.bundle import default_bundle, load_bundle

    if _default_missing(args):
        print(f"s2t: skipped, it needs spoken questions (no {DEFAULT_BENCHMARK[len('local:'):]})")
        return []
    items = benchmark_items(args.benchmark, args.n, audio=True)
    model = load_bundle(args.model or default_bundle()).model
    kw = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    return measure("s2t", S2TAnswerer(model, **kw), items, args.batch_size)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", default=DEFAULT_BENCHMARK,
                    help="a benchmark spec of `echox eval` (local:PATH, NAME=PATH, ...)")
    ap.add_argument("--n", type=int_at_least(1), default=32, help="first N items")
    ap.add_argument("--batch-size", type=int_at_least(1), default=16)
    ap.add_argument("--modes", default="text,s2t", help="comma-separated: text, s2t")
    ap.add_argument("--threads", type=int_at_least(1), default=1, help="torch CPU threads")
    ap.add_argument("--model", help="s2t: EchoX bundle folder (default: as `echox eval`)")
    ap.add_argument("--llm", help="text: the LLM (default: the --config's LLM)")
    ap.add_argument("--config", default="tiny", help="text: preset/YAML naming the LLM")
    ap.add_argument("--system-prompt", default="Answer in one short sentence.", help="text")
    ap.add_argument("--max-new-tokens", type=int_at_least(1), default=None,
                    help="default: as `echox eval` (48 text, 64 s2t)")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"text", "s2t"}:
        ap.error(f"--modes takes text and/or s2t, got {args.modes!r}")
    args.modes = modes
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    for mode in args.modes:
        rows += text_rows(args) if mode == "text" else s2t_rows(args)
    print(f"batch size 1 against {args.batch_size}, {args.threads} thread(s)")
    print_table(rows)
    return 0


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
