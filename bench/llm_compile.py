"""Does torch.compile speed up a Stage I step's LLM on this CPU? Eager against compiled.

    python bench/llm_compile.py [--threads 1] [--steps 8] [--batch 8] [--lengths 52 60 47 66]

The LLM of the tiny recipe (SmolLM2-135M-Instruct with the LoRA of `recipes/tiny/model.yaml`)
runs a forward and backward pass under bf16 autocast, as a Stage I step does, on random input
embeddings of `--batch` rows and the given lengths in turn (a Stage I batch's length changes
from step to step), with the vocabulary projected on the second half of each row only (the
label positions). The decoder stack is then wrapped in `torch.compile(dynamic=True)` (inductor)
and timed the same way. The first compiled steps, which compile, are timed apart
(`compile_s`). The table gives the median seconds per step after `--warmup` steps, the
speed-up and the largest loss difference between the two (the same inputs in the same order).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from echox.config import int_at_least

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int_at_least(1), default=1)
    ap.add_argument("--steps", type=int_at_least(1), default=8, help="timed steps per variant")
    ap.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed steps before the timed ones")
    ap.add_argument("--batch", type=int_at_least(1), default=8)
    ap.add_argument("--lengths", type=int_at_least(1), nargs="+", default=[52, 60, 47, 66])
    ap.add_argument("--config", default="recipes/tiny/model.yaml")
    args = ap.parse_args(argv)

    import torch

    from echox.config import load_config
    from echox.hub.packaged import _smollm2
    from echox.model.llm import LLM

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config).llm
    llm = LLM.from_folder(_smollm2(), cfg)
    d = llm.hidden_size
    gen = torch.Generator().manual_seed(0)
    n_inputs = args.warmup + args.steps
    inputs = [torch.randn(args.batch, args.lengths[i % len(args.lengths)], d, generator=gen)
              for i in range(n_inputs)]

    def step(x: torch.Tensor) -> tuple[float, float]:
        x = x.clone().requires_grad_(True)
        mask = torch.ones(x.shape[:2], dtype=torch.long)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = llm(x, mask, logits_to_keep=torch.arange(x.shape[1] // 2, x.shape[1]))
            loss = out.logits.float().logsumexp(-1).mean()
        loss.backward()
        llm.zero_grad(set_to_none=True)
        return time.perf_counter() - t, float(loss)

    def timed() -> tuple[list[float], list[float]]:
        res = [step(x) for x in inputs]
        return [s for s, _ in res[args.warmup:]], [v for _, v in res]

    eager_s, eager_loss = timed()
    decoder = llm.base.model  # the transformer stack (embeddings, layers, norm)
    llm.base.model = torch.compile(decoder, dynamic=True)
    t0 = time.perf_counter()
    for x in inputs[:2]:  # the compiles (one per new shape class)
        step(x)
    compile_s = time.perf_counter() - t0
    comp_s, comp_loss = timed()
    diff = max(abs(a - b) for a, b in zip(eager_loss, comp_loss))
    e, c = statistics.median(eager_s), statistics.median(comp_s)
    print(f"threads {args.threads}, batch {args.batch}, lengths {args.lengths}, torch {torch.__version__}")
    print(f"{'variant':10s} {'s/step':>8s} {'speed-up':>9s} {'compile_s':>10s} {'max |dloss|':>12s}")
    print(f"{'eager':10s} {e:8.2f} {1.0:8.2f}x {'':>10s} {'':>12s}")
    print(f"{'compiled':10s} {c:8.2f} {e / c:8.2f}x {compile_s:10.1f} {diff:12.2e}")
    return 0


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
