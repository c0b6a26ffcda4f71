"""EchoX-Dialogues shards -> the manifests that units are extracted from and attached to.

    python recipes/3b/dialogues_tts.py data/full/EchoX-Dialogues --out data/full/tts \
        [--hf ID_OR_FOLDER[:SPLIT] ...]

Writes, under --out:

- `dialogues.jsonl`: every dialogue of every `data.json` below the folder, with an `id`
  (`<shard folder>/<index>`; the shards have none) and absolute audio paths;
- `tts.jsonl`: one TTS record `{id, text, audio}` per assistant turn that has audio (the
  response spoken), id = the dialogue's id, or `<id>-a<k>` for the k-th assistant turn of a
  dialogue with several, which is what `echox units attach` matches on. `--hf` adds the rows of
  further TTS corpora (hub ids or local copies with audio + text columns, e.g. the paper's
  Stage II sets), audio written under `--out/hf-audio`; they train the T2C only.

Used by recipes/3b/prepare_data.sh (both the 3B and the 8B recipes read its output).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from echox.data.hf import load_hf_asr
    from echox.data.manifest import read_dialogues_json, resolve_audio, write_jsonl

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", help="a folder of extracted EchoX-Dialogues shards (data.json + wavs)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--hf", action="append", default=[], metavar="ID[:SPLIT]",
                    help="a further TTS corpus (audio + text columns); repeatable")
    args = ap.parse_args(argv)
    root, out = Path(args.shards), Path(args.out)
    shards = sorted(root.rglob("data.json"))
    if not shards:
        print(f"no data.json below {root}: extract the EchoX-Dialogues tar shards there", file=sys.stderr)
        return 2
    dialogues, tts = [], []
    for shard in shards:
        rep = read_dialogues_json(shard, on_error="skip")
        name = shard.parent.relative_to(root).as_posix()
        for i, rec in enumerate(rep.records):
            rec.id = f"{name}/{i}"
            for m in rec.conversations:
                if isinstance(m.audio, str):
                    m.audio = str(Path(resolve_audio(m.audio, rep.base_dir)).absolute())
            turns = [m for m in rec.conversations if m.role == "assistant"]
            for k, m in enumerate(turns):
                if isinstance(m.audio, str) and m.value.strip():
                    tid = rec.id if len(turns) == 1 else f"{rec.id}-a{k}"
                    tts.append({"id": tid, "text": m.value, "audio": m.audio})
            dialogues.append(rec)
    for spec in args.hf:
        src, _, split = spec.partition(":")
        for j, r in enumerate(load_hf_asr(src, split or "train", audio_dir=out / "hf-audio",
                                          on_error="skip")):
            tts.append({"id": f"{Path(src).name}/{r.id or j}", "text": r.text, "audio": r.audio})
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "dialogues.jsonl", dialogues)
    write_jsonl(out / "tts.jsonl", tts)
    print(json.dumps({"shards": len(shards), "dialogues": len(dialogues), "tts_pairs": len(tts),
                      "out": str(out)}))
    if not tts:
        print("no assistant turn has audio: T2C and the gold baseline need TTS audio of the "
              "responses (--hf, or synthesize it)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
