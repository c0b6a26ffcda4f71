"""`echox demo`: answer a spoken question with speech, offline, with the embedded model.

It loads the default bundle (`$ECHOX_MODEL`, the cache, or the model shipped in the package),
plays the packaged question ("What is the capital of Japan?", piper joe voice) or `--question
FILE` through the streaming engine, prints the text as it is generated, writes the spoken
answer, and transcribes it with Whisper tiny.en so you can read what was said.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from echox.audio import check_output_path, load_audio, save_audio
from echox.config import preset_config
from echox.errors import ConfigError, NoBundleError
from echox.infer.asr import FasterWhisperASR
from echox.infer.bundle import DEFAULT_MODEL_HELP, Bundle, bundle_folder, load_bundle
from echox.infer.chat import add_max_audio_option, check_not_question, question_limit
from echox.infer.engine import (
    AudioChunk,
    Engine,
    EngineConfig,
    Final,
    Segment,
    TextDelta,
    check_max_audio_seconds,
    check_question,
)
from echox.model.checkpoint import add_base_model_options, base_models_of
from echox.model.echox import EchoX
from echox.vocoder.code_hifigan import CodeHiFiGAN, CodeHiFiGANConfig

QUESTION = "question.wav"


def packaged_question() -> Path:
    return Path(str(resources.files("echox") / "assets" / QUESTION))


def _random_bundle() -> Any:
    """No trained model anywhere: the tiny-random preset with a random CodeHiFiGAN, so the
    whole pipeline still runs (its output is noise by design)."""
    model = EchoX.build(preset_config("tiny-random"))
    model.eval()
    return Bundle(model, CodeHiFiGAN(CodeHiFiGANConfig.tiny()).eval(), None)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.max_audio_seconds is not None:  # before the slow model load
        check_max_audio_seconds(args.max_audio_seconds)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    question = Path(args.question) if args.question else packaged_question()
    try:  # a $ECHOX_MODEL that names no folder is an error here, not a fallback
        folder: Path | None = bundle_folder(args.model)
    except NoBundleError:  # no bundle anywhere: the fallback below says so
        folder = None
    limit = (question_limit(folder, args.max_audio_seconds) if folder is not None
             else args.max_audio_seconds)
    check_question(question, limit)  # a bad or too long question fails before the load
    out = check_output_path(args.output)
    check_not_question(out, question)
    t0 = time.perf_counter()
    if folder is not None:  # named or found, so it must load: a damaged one is an error, not noise
        bundle, where = load_bundle(folder, base_models=base_models_of(args)), args.model or str(folder)
    else:
        if args.base_llm or args.base_encoder:  # they would be ignored by the untrained fallback
            raise ConfigError("--base-llm / --base-encoder: no EchoX model bundle was found to read "
                              "them for; give --model")
        print("echox demo: no EchoX model bundle found; falling back to the tiny-random model "
              "(untrained: expect noise)", file=sys.stderr)
        bundle, where = _random_bundle(), "tiny-random (untrained)"
    print(f"model: {where}  (loaded in {time.perf_counter() - t0:.1f} s)")
    print(f"question: {question}")
    engine = Engine(bundle, EngineConfig.greedy(args.max_new_tokens),
                    max_audio_seconds=args.max_audio_seconds)
    final = None
    with engine:
        events = engine.session().respond(audio=str(question))
        first = next(events)  # bad input raises here, before "answer: " starts a line
        sys.stdout.write("answer: ")
        for ev in itertools.chain([first], events):
            if isinstance(ev, TextDelta):
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            elif isinstance(ev, Segment) and args.verbose:
                print(f"\n  [Segment {ev.index}]", file=sys.stderr)
            elif isinstance(ev, AudioChunk) and args.verbose:
                tail = ", last" if ev.last else ""
                print(f"\n  [AudioChunk {ev.index}.{ev.part}: {ev.audio.size / ev.sample_rate:.2f} s,"
                      f" {len(ev.units)} units{tail}]", file=sys.stderr)
            elif isinstance(ev, Final):
                final = ev
    print()
    if final is None:  # pragma: no cover
        raise RuntimeError("the engine ended without a final event")
    print(f"stats: {final.stats.format()}")
    if final.audio.size == 0:
        print("no speech was produced (the model emitted no units)")
        return 0
    save_audio(out, final.audio, final.sample_rate, clip=True)
    print(f"spoken answer: {out} ({final.audio.size / final.sample_rate:.2f} s)")
    if not args.no_asr:
        # What is in the file, as a listener gets it (16-bit samples), not the float samples
        # before writing: on a marginal word the rounding alone can change what Whisper hears.
        heard = load_audio(out, final.sample_rate, max_seconds=None)
        print(f"what Whisper tiny.en hears: {FasterWhisperASR().transcribe(heard, final.sample_rate)!r}")
    return 0


def demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"bundle folder {DEFAULT_MODEL_HELP}")
    add_base_model_options(p)
    p.add_argument("--question", help="a wav/flac/ogg question (default: the packaged one)")
    p.add_argument("-o", "--output", default="answer.wav", help="where to write the spoken answer")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-asr", action="store_true", help="do not transcribe the spoken answer")
    p.add_argument("--verbose", action="store_true", help="show segment / audio events")

    add_max_audio_option(p)

