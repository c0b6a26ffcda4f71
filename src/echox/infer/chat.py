"""`echox chat`: talk to an EchoX bundle from the command line, with streaming speech output.

    echox chat question.wav -o answer.wav        one spoken question
    echox chat --text "What is the capital of France?"
    echox chat                                   interactive: each line is a wav path (speech
                                                 turn) or text; /reset forgets, /quit ends

The text is printed as it is decoded; each answer's audio is written to `-o` (one turn) or
`<stem>_<n>.wav` (interactive turns; the next n whose file is not there yet, so an earlier
session's answers stay). It is a thin client of `echox.infer.engine`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from echox.audio import check_output_path, save_audio
from echox.config import MAX_THREADS, EncoderConfig, int_at_least
from echox.errors import AudioError, EchoXError
from echox.infer.bundle import (DEFAULT_MODEL_HELP, add_device_options, add_sampling_options, add_text_decoding_options, check_device,
                                bundle_folder, load_bundle, sampling_temperature, text_decoding)
from echox.infer.engine import (
    Engine,
    EngineConfig,
    Final,
    TextDelta,
    check_max_audio_seconds,
    check_question,
)
from echox.model.checkpoint import add_base_model_options, base_models_of
from echox.model.generation import SamplingConfig

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def question_limit(folder: Path, max_audio_seconds: float | None) -> float | None:
    """The longest spoken question the bundle at `folder` will accept, known before loading
    it: `--max-audio-seconds`, else the `encoder.max_seconds` of its config.json (read as
    plain JSON). None when that cannot be read: the bundle loader then reports the problem."""
    import json


    if max_audio_seconds is not None:
        return float(max_audio_seconds)
    try:
        meta = json.loads((Path(folder) / "config.json").read_text())
        value = meta["config"]["encoder"].get("max_seconds", EncoderConfig.max_seconds)
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return None
    return float(value)


def check_not_question(out: Path, question: Path) -> None:
    """Refuse an answer path that is the question file (`chat q.wav -o q.wav`, `demo`)."""
    if out.exists() and out.resolve() == question.resolve():
        raise AudioError(f"'{out}': the answer would overwrite the question; give another -o")


def check_inputs(args: argparse.Namespace, limit: float | None) -> None:
    """Check the spoken question (readable, complete, not too short or long) and that the
    answer can be written, so that a bad input fails at once, not after the model load."""
    if args.input is not None:
        check_question(args.input, limit)
    elif args.text is not None and not args.text.strip():  # the engine's refusal, before the load
        raise EchoXError("a user turn needs speech (a wav path, bytes or samples) or text")
    out = Path(args.output or "answer.wav")
    if args.input is None and args.text is None:  # interactive: answer_1.wav, answer_2.wav, ...
        out = out.with_name(f"{out.stem}_1{out.suffix or '.wav'}")
        if sys.stdin is None:  # started with stdin closed (`<&-`): no turn can be read
            raise EchoXError("interactive chat reads its turns from standard input, which is "
                             "closed; give a question file or --text")
    check_output_path(out)
    if args.input is not None:
        check_not_question(out, Path(args.input))


def _engine(args: argparse.Namespace) -> Any:
    """Load the bundle and build the engine the options describe."""
    import torch

    try:  # check the options before the slow model load
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens,
                                  temperature=sampling_temperature(args), top_p=args.top_p, seed=args.seed,
                                  **text_decoding(args))
    except ValueError as e:
        raise EchoXError(f"sampling options: {e}") from e
    if args.whole_response and not args.no_stream:
        raise EchoXError("--whole-response needs --no-stream")
    if args.max_audio_seconds is not None:
        check_max_audio_seconds(args.max_audio_seconds)
    check_device(args.device)
    cfg = EngineConfig(sampling=sampling, stream=not args.no_stream,
                       whole_response=args.whole_response, workers=args.workers,
                       chunk_units=args.chunk_units, first_chunk_units=args.first_chunk_units)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    path = bundle_folder(args.model)
    check_inputs(args, question_limit(path, args.max_audio_seconds))  # before the slow load
    print(f"echox: loading {path}", file=sys.stderr)
    bundle = load_bundle(path, vocoder=args.vocoder, unit_language=args.unit_language,
                         device=args.device, dtype=args.dtype, base_models=base_models_of(args))
    if bundle.vocoder is None:
        print("echox: this bundle has no vocoder: text answers only", file=sys.stderr)
    return Engine(bundle, cfg, max_audio_seconds=args.max_audio_seconds)


def _run_turn(session: Any, out: Path, show_stats: bool, stdout: TextIO,
              audio: str | None = None, text: str | None = None) -> None:
    """One turn: print text as it arrives, save the audio, optionally print the stats."""
    final = None
    for ev in session.respond(audio=audio, text=text):
        if isinstance(ev, TextDelta):
            stdout.write(ev.text)
            stdout.flush()
        elif isinstance(ev, Final):
            final = ev
    stdout.write("\n")
    assert final is not None
    if final.audio.size:
        save_audio(out, final.audio, final.sample_rate, clip=True)
        print(f"echox: wrote {out} ({final.stats.audio_seconds:.2f} s)", file=sys.stderr)
    elif session.engine.vocoder is not None:
        print("echox: the answer has no speech units; no audio written", file=sys.stderr)
    if show_stats:
        stdout.write(f"stats: {final.stats.format()}\n")
        stdout.flush()


def _as_path_if_quoted(line: str) -> str:
    """A dragged-in or copied path ('/a b/q.wav', "~/q.wav") as a plain one, where it names an
    audio file; any other line as typed (a quoted question stays a question)."""
    inner = line[1:-1] if len(line) > 1 and line[0] == line[-1] and line[0] in "'\"" else line
    path = os.path.expanduser(inner)
    if path.lower().endswith(AUDIO_SUFFIXES) or os.path.isfile(path):
        return path
    return line


def _sounds_like_audio(path: str) -> bool:
    """Whether a file starts as a wav, flac or ogg file does (a recording saved without a
    suffix; a README is not one)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in (b"RIFF", b"RIFX", b"RF64", b"fLaC", b"OggS")


def _path_kind(line: str) -> tuple[bool, bool]:
    """(exists, is a folder) for a typed line; (False, False) for text no path can be (too
    long a name, a NUL byte)."""
    try:
        p = Path(line)
        return p.exists(), p.is_dir()
    except (OSError, ValueError):
        return False, False


def _interactive(session: Any, args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    """Multi-turn dialogue from stdin lines; errors of one turn do not end the session."""
    base = Path(args.output or "answer.wav")
    n = 0
    asked: set[Path] = set()  # the audio files read as questions: no answer overwrites them
    prompt = sys.stderr.isatty() and stdin.isatty()
    if hasattr(stdin, "reconfigure"):  # a line of non-UTF-8 bytes is that turn's error, not a
        stdin.reconfigure(errors="surrogateescape")  # UnicodeDecodeError ending the session
    print("echox: a wav path = spoken turn, other text = typed turn; /reset, /quit",
          file=sys.stderr)
    while True:
        if prompt:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.split()[0] in ("/quit", "/reset") and len(line.split()) > 1:
            print(f"echox: error: {line.split()[0]} takes no arguments", file=sys.stderr)
            continue
        if line == "/quit":
            return 0
        if line == "/reset":
            session.reset()
            print("echox: history cleared", file=sys.stderr)
            continue
        line = _as_path_if_quoted(line)
        named = line.lower().endswith(AUDIO_SUFFIXES)
        exists, folder = _path_kind(line)
        if line.startswith("/") and "/" not in line[1:] and not named and not exists:
            print(f"echox: error: unknown command {line.split()[0]}; /reset, /quit", file=sys.stderr)
            continue
        if folder and "/" in line:  # a path typed by mistake (a one-word question stays text)
            print(f"echox: error: '{line}' is a folder, not an audio file", file=sys.stderr)
            continue
        # a file named without an audio suffix is audio only as a path ("README" typed as a
        # question is text, even where such a file lies)
        is_audio = named or (exists and not folder and ("/" in line or "." in line
                                                        or _sounds_like_audio(line)))
        out = base.with_name(f"{base.stem}_{n + 1}{base.suffix or '.wav'}")
        if is_audio and exists:
            asked.add(Path(line).resolve())
        while out.resolve() in asked or out.exists():  # a question read this session, or a
            n += 1  # file there before (an earlier session's answers) is not overwritten: the
            out = base.with_name(f"{base.stem}_{n + 1}{base.suffix or '.wav'}")  # answer skips it
        try:
            _run_turn(session, out, args.stats, stdout,
                      audio=line if is_audio else None, text=None if is_audio else line)
            if out.exists():  # an answer of no speech writes no file and takes no number
                n += 1
        except EchoXError as e:
            if args.debug:
                raise
            print(f"echox: error: {e}", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    with _engine(args) as engine:
        session = engine.session()
        if args.input is None and args.text is None:
            return _interactive(session, args, sys.stdin, sys.stdout)
        _run_turn(session, Path(args.output or "answer.wav"), args.stats, sys.stdout,
                  audio=args.input, text=args.text)
        return 0


def add_max_audio_option(p: argparse.ArgumentParser) -> None:
    """`--max-audio-seconds`, shared by `echox chat` and `echox demo`."""
    p.add_argument("--max-audio-seconds", type=float, metavar="S",
                   help="longest spoken question accepted, in seconds (default: the model's "
                        "encoder.max_seconds, 30; at most 600); longer ones are refused with one line. "
                        "Speech longer than the encoder window is encoded window by window")


def chat_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="?", help="spoken question (wav/flac/ogg); omit for interactive")
    p.add_argument("--text", help="typed question (with an input wav: text after the speech)")
    p.add_argument("--model", help=f"model bundle folder {DEFAULT_MODEL_HELP}")
    p.add_argument("--vocoder", help="vocoder folder replacing the bundle's own")
    p.add_argument("--unit-language", help="unit-language folder replacing the bundle's own")
    p.add_argument("-o", "--output", help="answer audio (default answer.wav; interactive: "
                                          "answer_<n>.wav, never over an existing file)")
    p.add_argument("--no-stream", action="store_true",
                   help="voice the answer after the text is complete (same segments)")
    p.add_argument("--whole-response", action="store_true",
                   help="with --no-stream: one echo segment for the whole answer")
    p.add_argument("--stats", action="store_true", help="print latency statistics per turn")
    add_sampling_options(p)
    add_text_decoding_options(p)
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    p.add_argument("--seed", type=int, help="seed for sampling (reproducible answers)")
    p.add_argument("--speech-workers", "--workers", dest="workers", type=int_at_least(1), default=1,
                   help="speech worker threads (as echox serve --speech-workers; --workers is "
                        "the older name)")
    p.add_argument("--chunk-units", type=int, default=40,
                   help="units per audio chunk after a segment's first; 0 = whole segments")
    p.add_argument("--first-chunk-units", type=int, default=20,
                   help="units in a segment's first audio chunk (smaller: earlier audio)")
    p.add_argument("--threads", type=int_at_least(1, MAX_THREADS), help="torch intra-op threads (default: torch's)")

    add_device_options(p)
    add_base_model_options(p)
    add_max_audio_option(p)

