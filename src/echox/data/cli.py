"""`echox data`: build the tiny spoken-QA corpus, validate manifests."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_validate(args: argparse.Namespace) -> int:
    from echox.data.manifest import validate_manifest

    bad = 0
    for path in args.manifest:
        rep = validate_manifest(path, args.schema, check_audio=not args.no_audio,
                                max_audio_seconds=args.max_seconds)
        print(rep.summary())
        bad += not rep.ok
    return 1 if bad else 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser("data", help="build corpora and check manifests")
    dsub = p.add_subparsers(dest="data_command", required=True)
    v = dsub.add_parser("validate", help="check manifests line by line (and their audio files)")
    v.add_argument("manifest", nargs="+", help="JSONL manifest(s), or an EchoX-Dialogues data.json")
    v.add_argument("--schema", choices=["asr", "tts", "dialogue"], default="dialogue")
    v.add_argument("--no-audio", action="store_true", help="skip the audio file checks")
    v.add_argument("--max-seconds", type=float, default=None, help="flag audio longer than this")
    v.set_defaults(func=cmd_validate)
    from echox.data.tiny_corpus import add_cli as add_build_tiny

    add_build_tiny(dsub)
    from echox.data.s2t_mix import add_cli as add_s2t_mix

    add_s2t_mix(dsub)
