"""Is bf16 autocast worth it on this CPU? Times float32 against bfloat16 on the work a training
step does: a plain matmul, and a forward + backward pass of a transformer layer under autocast
(as `train.precision: bf16` runs it), and prints the table with what the trainer will use.

    python bench/cpu_bf16.py --threads 1
    python bench/cpu_bf16.py --threads 2 --size 1024 --reps 10 --json runs/bench/cpu_bf16.json

CPUs with AVX512-BF16 or AMX compute bf16 natively; elsewhere torch emulates it, and the
trainer then runs a bf16 recipe in fp32 (`echox.train.trainer.effective_precision`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from echox.config import int_at_least


def _time(fn, reps: int) -> float:
    fn()  # warm-up (kernel selection, allocations)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def matmul_gflops(size: int, dtype: torch.dtype, reps: int) -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dtype)
    b = torch.randn(size, size, generator=g).to(dtype)
    return 2 * size ** 3 / _time(lambda: a @ b, reps) / 1e9


def layer_step_ms(width: int, seq: int, batch: int, autocast: bool, reps: int) -> float:
    """One forward + backward of a pre-norm transformer encoder layer (float32 weights), with
    or without bf16 autocast."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(width, max(1, width // 64), 4 * width, dropout=0.0,
                                             batch_first=True, norm_first=True)
    x = torch.randn(batch, seq, width)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = layer(x).float().pow(2).mean()
        loss.backward()
        layer.zero_grad(set_to_none=True)

    return _time(step, reps) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int_at_least(1), default=1)
    p.add_argument("--size", type=int_at_least(16), default=1024, help="matmul side")
    p.add_argument("--width", type=int_at_least(64), default=576,
                   help="layer width (576: SmolLM2-135M's)")
    p.add_argument("--seq", type=int_at_least(1), default=128)
    p.add_argument("--batch", type=int_at_least(1), default=8)
    p.add_argument("--reps", type=int_at_least(1), default=5)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if args.json:  # before the run: a bad path would lose its results, an input be replaced
        from echox.fileio import check_out_path

        check_out_path(args.json, "--json", folder=False, inputs=[])
    torch.set_num_threads(args.threads)

    from echox.model.precision import cpu_has_fast_bf16
    from echox.train.trainer import effective_precision

    native = cpu_has_fast_bf16()
    uses = effective_precision("bf16", cuda=False)
    rows = []
    f32 = matmul_gflops(args.size, torch.float32, args.reps)
    b16 = matmul_gflops(args.size, torch.bfloat16, args.reps)
    rows.append({"work": f"matmul {args.size}^2 (GFLOP/s)", "fp32": f32, "bf16": b16,
                 "bf16_speedup": b16 / f32})
    f32 = layer_step_ms(args.width, args.seq, args.batch, False, args.reps)
    b16 = layer_step_ms(args.width, args.seq, args.batch, True, args.reps)
    rows.append({"work": f"layer fwd+bwd {args.batch}x{args.seq}x{args.width} (ms)", "fp32": f32,
                 "bf16": b16, "bf16_speedup": f32 / b16})
    print(f"CPU bf16: {'native (AVX512-BF16 or AMX)' if native else 'emulated'}; "
          f"torch {torch.__version__}, {args.threads} thread(s), capability "
          f"{torch.backends.cpu.get_cpu_capability()}; train.precision bf16 runs as {uses}")
    print(f"| {'work':<44} | {'fp32':>9} | {'bf16':>9} | bf16 speed-up |")
    print(f"|{'-' * 46}|{'-' * 11}:|{'-' * 11}:|--------------:|")
    for r in rows:
        print(f"| {r['work']:<44} | {r['fp32']:>9.2f} | {r['bf16']:>9.2f} | {r['bf16_speedup']:>12.2f}x |")
    if args.json:
        from echox.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps({"native_bf16": native, "bf16_runs_as": uses,
                                                 "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    import _cli
    sys.exit(_cli.run(main))
