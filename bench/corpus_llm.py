"""The corpus builder's answer generation: `model.generate` against `greedy_shrinking`.

    python bench/corpus_llm.py [--questions data/tiny/test/qa.jsonl] [--n 128] [--batch-size 64]

Both decode the same chat prompts greedily in batches (left padding, at most
`--max-new-tokens`); `generate` runs every row of a batch until the longest answer ends,
`greedy_shrinking` drops each row once it has ended. Prints a table: seconds, answers per
minute and how many rows came out token-identical to `generate`. Run it on an idle machine;
the LLM uses `--threads` torch threads (1, as in the corpus build).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from echox.config import int_at_least
from echox.fileio import json_lines

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def read_questions(path: Path) -> list[str]:
    """The `question` of each record of a JSONL file; a bad file or line stops with one line."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    out = []
    for i, rec, error in json_lines(path):
        if error is not None or not isinstance(rec, dict) or "question" not in rec:
            raise SystemExit(f"{path}:{i}: not a JSON record with a question"
                             + (f" ({error})" if error else ""))
        out.append(str(rec["question"]))
    if not out:
        raise SystemExit(f"{path}: holds no questions")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", default=None,
                    help="JSONL with a `question` field (default: recipes/tiny/questions.jsonl)")
    ap.add_argument("--n", type=int_at_least(1), default=128)
    ap.add_argument("--batch-size", type=int_at_least(1), default=64)
    ap.add_argument("--max-new-tokens", type=int_at_least(1), default=48)
    ap.add_argument("--threads", type=int_at_least(1), default=1)
    ap.add_argument("--llm", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    args = ap.parse_args(argv)
    questions = read_questions(Path(args.questions)) if args.questions else None

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from echox.data.tiny_corpus import DEFAULT_SYSTEM_PROMPT, greedy_shrinking, load_questions
    from echox.hub import resolve

    torch.set_num_threads(args.threads)
    if questions is None:
        questions = [q.question for q in load_questions()]
    questions = questions[: args.n]
    folder = resolve(args.llm)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    prompts = [tok.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                        {"role": "user", "content": q}],
                                       tokenize=False, add_generation_prompt=True)
               for q in questions]

    def run(mode: str) -> tuple[float, list[list[int]]]:
        out: list[list[int]] = []
        t0 = time.perf_counter()
        for i in range(0, len(prompts), args.batch_size):
            enc = tok(prompts[i:i + args.batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=False)
            if mode == "greedy_shrinking":
                out += greedy_shrinking(model, enc["input_ids"], enc["attention_mask"],
                                        args.max_new_tokens, eos_ids)
                continue
            with torch.inference_mode():
                gen = model.generate(**enc, do_sample=False, max_new_tokens=args.max_new_tokens,
                                     pad_token_id=tok.pad_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():  # cut after the first EOS
                end = next((k for k, t in enumerate(row) if t in eos_ids), None)
                out.append(row[: end + 1] if end is not None else row)
        return time.perf_counter() - t0, out

    results = {mode: run(mode) for mode in ("generate", "greedy_shrinking")}
    ref = results["generate"][1]
    print(f"{len(prompts)} questions, batch {args.batch_size}, {args.threads} thread(s)")
    print("| decoding | seconds | answers/min | rows identical to generate |")
    print("|---|---|---|---|")
    for mode, (sec, rows) in results.items():
        same = sum(a == b for a, b in zip(rows, ref))
        print(f"| {mode} | {sec:.1f} | {60 * len(rows) / sec:.0f} | {same}/{len(rows)} |")
    return 0


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
