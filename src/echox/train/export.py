"""`echox train export`: a slim copy of a training checkpoint, to keep or to start from.

    echox train export --model runs/tiny/s2t/model --out recipes/tiny/s2t-warm

A training checkpoint stores every part that has weights of its own, in float32, trained or not:
a Stage I model carries a T2C, an echo decoder and a denoiser that no stage has touched (for the
tiny model 24 of its 37 M stored parameters). The export keeps only what a trained stage wrote
(the parts no stage trained are left out and get their initial weights again on load), in
float16 by default: a Stage II model keeps its T2C alone, without the adapter and LoRA that no
s2t stage trained (`recipes/tiny/t2c-warm`, a `--t2c-from` of Stage III). `--drop-t2c` also
leaves out a trained T2C, as a shipped bundle does. `--drop-echo` leaves out a trained echo
decoder and denoiser and records the model as not trained by Stage III: the Stage I model inside
a bundle, for a new Stage III run whose echo decoder starts again from its T2C (`echox train
export --model src/echox/assets/models/tiny --drop-echo --out runs/tiny/s2t-v1`). The copy is an
ordinary EchoX checkpoint: `--init` of `echox train`, `EchoX.from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from echox.errors import CheckpointError
from echox.fileio import check_out_path
from echox.model.checkpoint import add_base_model_options, base_models_of, folder_overlap

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": None}


def untrained_parts(trained_stages: list[str], drop_t2c: bool = False,
                    shared_t2c_echo: bool = False) -> tuple[str, ...]:
    """The omittable parts that none of `trained_stages` trained (plus the T2C if asked).
    `shared_t2c_echo` (t2c.layout=authors: one module) keeps the echo decoder with a kept T2C."""
    omit = [] if "s2t" in trained_stages else ["adapter", "llm"]
    keep_t2c = not drop_t2c and "t2c" in trained_stages
    if not keep_t2c:
        omit.append("t2c")
    if "echo" not in trained_stages:
        omit += ["denoiser"] if shared_t2c_echo and keep_t2c else ["echo", "denoiser"]
    return tuple(omit)


def export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="an EchoX checkpoint folder (e.g. runs/tiny/s2t/model)")
    p.add_argument("--out", required=True, help="the new folder (must not exist)")
    add_base_model_options(p)
    p.add_argument("--dtype", choices=list(DTYPES), default="float16",
                   help="weights' storage type (loading casts back to the model's); default float16")
    p.add_argument("--drop-t2c", action="store_true",
                   help="leave out the T2C even if trained (inference never runs it)")
    p.add_argument("--drop-echo", action="store_true",
                   help="leave out the echo decoder and denoiser even if trained, and drop stage "
                        "echo from the copy's trained stages (a Stage I model to start Stage III again)")


def cmd_export(args: argparse.Namespace) -> int:
    from echox.model.echox import EchoX

    src, out = Path(args.model), Path(args.out)
    if out.exists():
        raise CheckpointError(f"--out {out} already exists; give a new folder")
    check_out_path(out)
    how = folder_overlap(out.resolve(), src.resolve())
    if how:  # inside the model's own vocoder/ or unit_language/: the model would not load
        raise CheckpointError(f"--out {out} {how} {src}: writing there would break the model "
                              "it copies; give another --out")
    model = EchoX.from_pretrained(src, base_models=base_models_of(args))
    if args.drop_echo:
        if model.t2c is model.echo and "t2c" in model.trained_stages and not args.drop_t2c:
            raise CheckpointError("--drop-echo: with t2c.layout=authors the echo decoder is the "
                                  "trained T2C; add --drop-t2c to leave out both")
        model.trained_stages = [s for s in model.trained_stages if s != "echo"]
    omit = untrained_parts(model.trained_stages, args.drop_t2c, shared_t2c_echo=model.t2c is model.echo)
    model.save_pretrained(out, omit_parts=omit, dtype=DTYPES[args.dtype])
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    stages = json.loads((out / "config.json").read_text()).get("trained_stages", [])  # as written
    if not stages:
        print(f"echox: warning: {out} keeps no trained stage (every trained part was left out)",
              file=sys.stderr)
    print(json.dumps({"model": str(src), "out": str(out), "trained_stages": stages,
                      "omitted_parts": list(omit), "dtype": args.dtype,
                      "megabytes": round(size / 1e6, 1)}))
    return 0
