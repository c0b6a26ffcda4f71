"""A trained T2C over unit-language tokens as the warm start of a T2C over the raw units
(docs/results.md, session 49): e.g. recipes/tiny/t2c-warm, 2,000 tokens over K = 500 units,
for a T2C that speaks the 500 units themselves.

A unit language's first K tokens are the single units (token u is unit u; checked here), so
their embedding and output rows carry over, and the 4 special rows (eos, text prefix, unit
prefix, pad) follow them. The transformer body and the text condition are copied as they are;
the rows of the merged tokens are dropped.

    python recipes/tiny/t2c_to_raw_units.py recipes/tiny/t2c-warm runs/t2c-raw-init
    echox train t2c --recipe recipes/tiny/t2c.yaml --init runs/t2c-raw-init \
        --set data.unit_language=null ...
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from echox.errors import EchoXError
from echox.model.echox import EchoX
from echox.units.language import UnitLanguage

SPECIALS = 4  # eos, text prefix, unit prefix, pad: the rows after the units (UnitDecoder)


def convert(src: Path, out: Path) -> None:
    if out.exists():
        raise EchoXError(f"{out} exists; give a new folder")
    if not (src / "unit_language").is_dir():
        raise EchoXError(f"{src} has no unit_language/: it is no T2C of unit-language tokens")
    warm = EchoX.from_pretrained(src)
    if "t2c" not in warm.trained_stages:
        raise EchoXError(f"{src} has no trained T2C (its stages: {warm.trained_stages})")
    lang = UnitLanguage.load(src / "unit_language")
    k, old_v = lang.num_units, warm.config.t2c.unit_vocab_size
    if any(lang.encode([u]) != [u] for u in range(k)):
        raise EchoXError(f"{src}/unit_language: token u is not unit u for every u < {k}")
    cfg = warm.config
    cfg.t2c.unit_vocab_size = k
    cfg.t2c.unit_language = None  # it speaks no language now: training with none must match
    # the unit budget of a spoken answer (units per condition position) grows as the tokens
    # split into their units, where the condition is the LLM's tokens: 8 language tokens per
    # text token are about 18 raw units. A character condition (the tiny recipe's) counts
    # characters: 8 per character is ample for raw units too (at most 4.4 on the 300 test
    # answers, docs/results.md, session 50), and a larger budget only lets a loop run longer.
    if not cfg.t2c.char_condition:
        stats = src / "unit_language" / "train_stats.json"  # `units train-language` writes it
        held = json.loads(stats.read_text()).get("heldout", {}) if stats.is_file() else {}
        per_token = held.get("units_per_token") or 2.5
        cfg.t2c.max_units_per_token = math.ceil(cfg.t2c.max_units_per_token * per_token)
    new = EchoX.build(cfg, tokenizer=warm.tokenizer)
    state, mine = warm.t2c.state_dict(), new.t2c.state_dict()
    for name, t in state.items():
        if mine[name].shape == t.shape:
            mine[name] = t.clone()
        elif t.shape[0] == old_v + SPECIALS and mine[name].shape[0] == k + SPECIALS:
            mine[name] = torch.cat([t[:k], t[old_v:]]).clone()  # the units, then the specials
            print(f"{name}: {tuple(t.shape)} -> {tuple(mine[name].shape)}")
        else:
            raise EchoXError(f"{name}: {tuple(t.shape)} does not map to {tuple(mine[name].shape)}")
    new.t2c.load_state_dict(mine)
    new.trained_stages = ["t2c"]
    new.save_pretrained(out, omit_parts=("adapter", "llm", "echo", "denoiser"))
    print(f"a T2C over the {k} raw units -> {out}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("t2c", type=Path, help="a trained T2C folder with its unit_language/")
    p.add_argument("out", type=Path, help="the new checkpoint folder (must not exist)")
    args = p.parse_args()
    try:
        convert(args.t2c, args.out)
    except EchoXError as e:
        print(f"t2c_to_raw_units: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
