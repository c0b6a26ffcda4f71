"""`echox data`: build the tiny spoken-QA corpus, validate manifests."""

from __future__ import annotations

import argparse

from echox.data.manifest import validate_manifest
from echox.errors import ManifestError


def cmd_validate(args: argparse.Namespace) -> int:
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise ManifestError(f"--max-seconds must be a number of seconds > 0, got {args.max_seconds}")
    bad, unread = 0, []
    for path in args.manifest:  # each is reported, also after one that cannot be read
        try:
            rep = validate_manifest(path, args.schema, check_audio=not args.no_audio,
                                    max_audio_seconds=args.max_seconds)
        except ManifestError as e:
            unread.append(str(e).splitlines()[0])
            continue
        print(rep.summary())
        bad += not rep.ok
    if unread:  # the one-line error of a command whose input could not be read (exit 2)
        others = len(args.manifest) - len(unread)
        raise ManifestError("; ".join(unread)
                            + (f" ({others} other manifest(s) reported above)" if others else ""))
    return 1 if bad else 0


def validate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", nargs="+", help="JSONL manifest(s), or an EchoX-Dialogues data.json")
    p.add_argument("--schema", choices=["asr", "tts", "dialogue"], default="dialogue")
    p.add_argument("--no-audio", action="store_true", help="skip the audio file checks")
    p.add_argument("--max-seconds", type=float, default=None, help="flag audio longer than this")
