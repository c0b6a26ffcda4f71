"""`echox serve`: the streaming speech API and its web page, on one loaded model.

    echox serve                                  the default bundle on http://127.0.0.1:8000
    echox serve --model runs/tiny/bundle --port 9000
    echox serve --host 0.0.0.0 --token "$(openssl rand -hex 16)"     reachable from the network
    echox serve --model /models/echox-8b --device cuda --dtype bf16 --host 0.0.0.0 --token ...   GPU

Open http://127.0.0.1:8000/ in a browser to talk to the model (microphone, file or typed
question; streamed text and speech). The API (WS /v1/stream, POST /v1/chat, GET /health,
GET /v1/models) is described in docs/api.md.

It binds 127.0.0.1 unless --host says otherwise; with --token (or $ECHOX_TOKEN) every /v1/
request needs `Authorization: Bearer TOKEN` (WebSocket clients may instead offer the
subprotocol bearer.TOKEN; the page asks for the token). Turns run on --workers worker threads;
--queue more may wait; past that the server answers 503 with Retry-After.

On a GPU machine (torch's CUDA build installed), --device cuda runs the model there, its weights
read straight onto the GPU; --dtype bf16 holds every weight in bfloat16 (default: the bundle's
config, e.g. a bfloat16 LLM beside float32 speech parts). README, "Serving" and "Released models".
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import math
import os
import re
import socket
import sys
from typing import Any

from echox.config import MAX_THREADS, int_at_least
from echox.errors import ConfigError, EchoXError
from echox.infer.bundle import (DEFAULT_MODEL_HELP, add_device_options, add_sampling_options, add_text_decoding_options, check_device,
                                bundle_folder, load_bundle, sampling_temperature, text_decoding)
from echox.infer.engine import Engine, EngineConfig, check_max_audio_seconds
from echox.model.checkpoint import add_base_model_options, base_models_of
from echox.model.generation import SamplingConfig
from echox.serve.app import ServeConfig, create_app
from echox.serve.connections import uvicorn_config

ENV_TOKEN = "ECHOX_TOKEN"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: `ServeConfig` fields by the option that sets them (its errors name the option)
_FLAGS = {"workers": "--workers", "queue_size": "--queue", "max_upload_bytes": "--max-upload-mb",
          "max_audio_seconds": "--max-audio-seconds", "max_text_chars": "--max-text-chars",
          "turn_timeout": "--turn-timeout", "upload_timeout": "--upload-timeout",
          "max_connections": "--max-connections", "idle_timeout": "--idle-timeout",
          "history_turns": "--history-turns", "token": "--token", "allow_origins": "--allow-origin",
          "model_id": "--model-id"}


def build(args: argparse.Namespace) -> tuple[Any, Any]:
    """(engine, app) from the options; checks every option before the slow model load."""
    import torch

    if args.token is not None and not args.token.strip():  # `--token "$UNSET"`: no token at all
        raise EchoXError("--token is empty; give the token, or leave the option out to serve without one")
    token = args.token or os.environ.get(ENV_TOKEN) or None
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0):  # int() of inf: a traceback
        raise EchoXError(f"--max-upload-mb must be a finite number > 0, got {args.max_upload_mb}")
    try:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens,
                                  temperature=sampling_temperature(args), top_p=args.top_p, seed=args.seed,
                                  **text_decoding(args))
        cfg = EngineConfig(sampling=sampling, workers=args.speech_workers,
                           chunk_units=args.chunk_units, first_chunk_units=args.first_chunk_units)
        serve_cfg = ServeConfig(
            token=token, workers=args.workers, queue_size=args.queue,
            max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
            max_audio_seconds=args.max_audio_seconds, max_text_chars=args.max_text_chars,
            turn_timeout=args.turn_timeout, upload_timeout=args.upload_timeout, max_connections=args.max_connections,
            idle_timeout=args.idle_timeout,
            history_turns=args.history_turns, allow_origins=tuple(args.allow_origin or ()),
            model_id=args.model_id)
    except (ValueError, ConfigError) as e:  # named as typed: --queue, not serve.queue_size
        msg = re.sub(r"\bserve\.(\w+)", lambda m: _FLAGS.get(m[1], m[0]), str(e))
        raise EchoXError(f"serve options: {msg}") from e
    if args.max_audio_seconds is not None:  # the cap the engine holds, before the load
        check_max_audio_seconds(args.max_audio_seconds)
    if not (math.isfinite(args.header_timeout) and args.header_timeout > 0):
        raise EchoXError(f"--header-timeout must be a finite number of seconds > 0, got {args.header_timeout}")
    if not 0 <= args.port <= 65535:
        raise EchoXError(f"--port must be 0-65535, got {args.port}")
    check_port_free(args.host, args.port)  # before the slow model load
    if not _is_loopback(args.host) and token is None:
        print(f"echox serve: warning: listening on {args.host} without --token: anyone who "
              "can reach this port can use the model", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    path = bundle_folder(args.model)
    print(f"echox serve: loading {path}", file=sys.stderr)
    check_device(args.device)
    bundle = load_bundle(path, vocoder=args.vocoder, unit_language=args.unit_language,
                         device=args.device, dtype=args.dtype, base_models=base_models_of(args))
    if bundle.vocoder is None:
        print("echox serve: this bundle has no vocoder: text answers only", file=sys.stderr)
    engine = Engine(bundle, cfg, max_audio_seconds=args.max_audio_seconds)
    return engine, create_app(engine, serve_cfg)


def check_port_free(host: str, port: int) -> None:
    """Refuse at once an address uvicorn could not listen on, such as a port another program
    uses (uvicorn would find out only after the model load, and say it in several lines of
    log). Every address `host` resolves to is tried, as uvicorn binds them all; port 0 (any
    free port) still tries the host."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise EchoXError(f"--host {host}: cannot resolve it ({e.strerror})") from e
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                s.bind(address)
            except OSError as e:
                hint = {errno.EADDRINUSE: "pass another --port, or stop the program that uses it",
                        errno.EACCES: "ports below 1024 need privileges: pass --port 1024 or above",
                        errno.EADDRNOTAVAIL: "this machine has no such address: check --host"}
                raise EchoXError(f"cannot listen on {shown} ({e.strerror}); "
                                 f"{hint.get(e.errno, 'check --host and --port')}") from e


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover - a dependency of echox

        raise EchoXError(f"echox serve needs uvicorn and fastapi ({e})") from e
    engine, app = build(args)
    with engine:
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"echox serve: http://{shown}:{args.port}/  (Ctrl-C stops)", file=sys.stderr)
        server = uvicorn.Server(uvicorn_config(
            app, args.host, args.port, header_timeout=args.header_timeout, log_level=args.log_level,
            ws_max_size=int(args.max_upload_mb * 1024 * 1024) + 65536,
            ws_ping_interval=20.0, ws_ping_timeout=20.0, timeout_graceful_shutdown=5))
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on: a clean stop
            pass  # (as uvicorn.run, which ended with status 0)
        if not server.started:  # it could not listen (uvicorn has logged why): as uvicorn.run
            raise SystemExit(3)
    return 0


def serve_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network and access")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 = all)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--token", help=f"require 'Authorization: Bearer TOKEN' on /v1/* (default: "
                                   f"${ENV_TOKEN}; unset = no token)")
    g.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                   help="a browser origin besides the server's own that may call the API "
                        "(repeatable; '*' = any)")
    g.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    m = p.add_argument_group("model")
    m.add_argument("--model", help=f"model bundle folder {DEFAULT_MODEL_HELP}")
    m.add_argument("--model-id", help="name shown by /v1/models (default: the folder's name)")
    m.add_argument("--vocoder", help="vocoder folder replacing the bundle's own")
    m.add_argument("--unit-language", help="unit-language folder replacing the bundle's own")
    add_device_options(m)
    add_base_model_options(m)
    m.add_argument("--threads", type=int_at_least(1, MAX_THREADS), help="torch intra-op threads (default: torch's)")
    d = p.add_argument_group("decoding")
    d.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    add_sampling_options(d)
    add_text_decoding_options(d)
    d.add_argument("--seed", type=int, help="seed for sampling")
    d.add_argument("--chunk-units", type=int, default=40,
                   help="units per audio chunk after a segment's first; 0 = whole segments")
    d.add_argument("--first-chunk-units", type=int, default=20,
                   help="units in a segment's first audio chunk (smaller: earlier audio)")
    d.add_argument("--speech-workers", type=int, default=1,
                   help="speech threads per engine (as echox chat --speech-workers)")
    lim = p.add_argument_group("load and limits")
    lim.add_argument("--workers", type=int, default=1, help="turns decoded at once (default 1)")
    lim.add_argument("--queue", type=int, default=8,
                     help="turns that may wait for a worker; more get 503 (default 8)")
    lim.add_argument("--max-connections", type=int, default=64,
                     help="open WebSocket conversations (default 64)")
    lim.add_argument("--max-upload-mb", type=float, default=16.0,
                     help="largest audio upload per turn, MiB (default 16)")
    lim.add_argument("--max-audio-seconds", type=float, metavar="S",
                     help="longest spoken question, in seconds (default: the model's "
                          "encoder.max_seconds, 30; at most 600); longer ones are refused (413 "
                          "audio_too_long). Speech longer than the encoder window is encoded "
                          "window by window")
    lim.add_argument("--max-text-chars", type=int, default=2000,
                     help="longest typed question (default 2000)")
    lim.add_argument("--turn-timeout", type=float, default=120.0,
                     help="seconds a turn may run before it is stopped (default 120)")
    lim.add_argument("--upload-timeout", type=float, default=60.0,
                     help="seconds a POST /v1/chat body may take to arrive (default 60); "
                          "slower uploads get 408 upload_timeout")
    lim.add_argument("--idle-timeout", type=float, default=900.0,
                     help="seconds a WebSocket conversation may send nothing while no turn runs "
                          "(default 900); then it is closed and its place freed")
    lim.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds a connection may take to send its request's headers "
                          "(default 10); slower ones are closed")
    lim.add_argument("--history-turns", type=int, default=8,
                     help="exchanges a conversation remembers (default 8)")

