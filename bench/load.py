"""Load test for `echox serve`: N concurrent WebSocket clients on loopback, bounded in count and time.

Each client opens one conversation and, until --duration runs out, asks the question (the
packaged "What is the capital of Japan?" or --question) as a wav file and reads the streamed
answer; a 503 (busy) is counted and the client waits the server's Retry-After before asking
again. Turns still running --grace seconds after the end are counted as unfinished.

By default it starts `echox serve` itself on a free loopback port (the embedded model, or
--model) and reads the server's peak RSS (VmHWM) from /proc; with --url it loads a running
server and reads peak_rss_mb from its /health.

    python bench/load.py --clients 8 --duration 30 --threads 1
    python bench/load.py --url http://127.0.0.1:8000 --clients 32 --duration 60 --json

It prints turns served, errors by kind, p50/p90 first-audio latency (client side: from the end
of the question to the first audio frame, queueing included; and the engine's own), the
server's peak RSS, and whether the server is still healthy afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from echox.config import int_at_least

MAX_CLIENTS = 64
MAX_DURATION = 600.0


@dataclass
class Results:
    rss_samples: list[float] = field(default_factory=list)
    served: int = 0
    unfinished: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_audio_ms: list[float] = field(default_factory=list)  # client side
    engine_first_audio_ms: list[float] = field(default_factory=list)  # the engine's stats
    total_ms: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return round(s[k], 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback
        return json.loads(r.read())


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak RSS (VmHWM) in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Start VmHWM afresh (Linux: `5 > clear_refs`), so that the peak of the model load does
    not hide the peak under load."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


async def sample_rss(base: str, out: list[float], stop: asyncio.Event) -> None:
    """The server's RSS from /health every 250 ms (works for --url servers too)."""
    while not stop.is_set():
        try:
            rss = (await asyncio.to_thread(get_json, base + "/health", 5)).get("rss_mb")
            if rss is not None:
                out.append(float(rss))
        except OSError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except asyncio.TimeoutError:
            pass


def wait_healthy(base: str, timeout: float = 10.0) -> tuple[bool, dict[str, Any]]:
    """Healthy: /health answers ok and no turn is left running (within `timeout`)."""
    deadline = time.monotonic() + timeout
    health: dict[str, Any] = {}
    while True:
        try:
            health = get_json(base + "/health")
            if health.get("status") == "ok" and health.get("running") == 0:
                return True, health
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False, health
        time.sleep(0.2)


async def client(i: int, ws_url: str, question: bytes, stop_at: float, hard_stop: float,
                 res: Results, headers: dict[str, str]) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import WebSocketException

    def left(until: float) -> float:
        return max(0.0, until - time.monotonic())

    try:
        async with connect(ws_url, max_size=None, additional_headers=headers,
                           open_timeout=30) as ws:
            ready = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if ready.get("type") != "ready":
                res.errors[ready.get("code", "refused")] += 1
                return
            while time.monotonic() < stop_at:
                await ws.send(json.dumps({"type": "audio", "format": "file"}))
                await ws.send(question)
                await ws.send(json.dumps({"type": "end"}))
                t0 = time.monotonic()
                first = None
                while True:
                    try:
                        msg = await asyncio.wait_for(ws.recv(), left(hard_stop))
                    except asyncio.TimeoutError:
                        res.unfinished += 1
                        return  # leaving closes the connection: the server stops the turn
                    if isinstance(msg, bytes):
                        if first is None:
                            first = (time.monotonic() - t0) * 1000
                        continue
                    ev = json.loads(msg)
                    if ev["type"] == "final":
                        res.served += 1
                        res.total_ms.append((time.monotonic() - t0) * 1000)
                        if first is not None:
                            res.first_audio_ms.append(first)
                        if ev["stats"].get("first_audio_ms") is not None:
                            res.engine_first_audio_ms.append(ev["stats"]["first_audio_ms"])
                        break
                    if ev["type"] == "error":
                        res.errors[ev.get("code", "error")] += 1
                        if ev.get("status") == 503:  # wait as told, then ask again
                            await asyncio.sleep(min(float(ev.get("retry_after", 1)),
                                                    left(stop_at)))
                        break
    except (OSError, WebSocketException, asyncio.TimeoutError) as e:
        res.errors[f"client:{type(e).__name__}"] += 1


async def run_clients(args: argparse.Namespace, base: str, question: bytes) -> Results:
    res = Results()
    ws_url = base.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/v1/stream"
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    now = time.monotonic()
    stop_at, hard_stop = now + args.duration, now + args.duration + args.grace
    done = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(base, res.rss_samples, done))
    await asyncio.gather(*(client(i, ws_url, question, stop_at, hard_stop, res, headers)
                           for i in range(args.clients)))
    done.set()
    await sampler
    return res


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    cmd = [sys.executable, "-m", "echox.cli", "serve", "--port", str(port), "--log-level",
           "warning", "--workers", str(args.workers), "--queue", str(args.queue),
           "--max-connections", str(max(MAX_CLIENTS, args.clients)),
           "--max-new-tokens", str(args.max_new_tokens), "--temperature", "0"]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.token:
        cmd += ["--token", args.token]
    log = Path(tempfile.mkstemp(prefix="echox-serve-", suffix=".log")[1])
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"echox serve exited ({proc.returncode}):\n"
                             f"{log.read_text()[-3000:]}")
        try:
            get_json(base + "/health", 2)
            return proc, base, log
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"echox serve did not come up in {args.startup_timeout} s"
                                 f":\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (default: start `echox serve` on loopback)")
    p.add_argument("--clients", type=int, default=8, help=f"concurrent clients, 1-{MAX_CLIENTS}")
    p.add_argument("--duration", type=float, default=30.0,
                   help=f"seconds to keep asking, at most {MAX_DURATION:g}")
    p.add_argument("--grace", type=float, default=60.0,
                   help="seconds to wait for answers under way after --duration")
    p.add_argument("--question", help="question audio file (default: the packaged one)")
    p.add_argument("--token", help="bearer token of the server")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    g = p.add_argument_group("the server this starts (without --url)")
    g.add_argument("--model", help="bundle folder (default: echox serve's default bundle)")
    g.add_argument("--workers", type=int_at_least(1), default=1)
    g.add_argument("--queue", type=int_at_least(0), default=8)
    g.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    g.add_argument("--threads", type=int_at_least(1), help="torch threads of the server")
    g.add_argument("--startup-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS:
        p.error(f"--clients must be 1-{MAX_CLIENTS}")
    if not 0 < args.duration <= MAX_DURATION:
        p.error(f"--duration must be in (0, {MAX_DURATION:g}]")
    if not 0 <= args.grace <= MAX_DURATION:
        p.error(f"--grace must be in [0, {MAX_DURATION:g}]")
    if not 0 < args.startup_timeout < math.inf:
        p.error("--startup-timeout must be a finite number of seconds > 0")
    if args.question:
        if not Path(args.question).is_file():
            raise SystemExit(f"--question {args.question}: no such file")
        from echox.infer.engine import check_question

        # read as the server will (every turn of a file that is no audio was a bad_audio error,
        # thousands a second, and the run ended "served 0 turns" with exit 0)
        check_question(args.question, None)
        question = Path(args.question).read_bytes()
    else:
        from echox.infer.demo import packaged_question

        question = packaged_question().read_bytes()

    proc = log = None
    if args.url:
        base = args.url.rstrip("/")
    else:
        proc, base, log = start_server(args)
    try:
        idle = get_json(base + "/health")
        fresh_peak = proc is not None and reset_peak_rss(proc.pid)
        t0 = time.monotonic()
        res = asyncio.run(run_clients(args, base, question))
        wall = time.monotonic() - t0
        healthy, health = wait_healthy(base)
        if fresh_peak:
            assert proc is not None
            peak, peak_how = peak_rss_mb(proc.pid), "VmHWM during the load"
        elif res.rss_samples:
            peak, peak_how = max(res.rss_samples), "most RSS seen by /health every 250 ms"
        else:
            peak, peak_how = health.get("peak_rss_mb"), "ru_maxrss, model load included"
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            if log is not None:
                log.unlink(missing_ok=True)

    report = {
        "clients": args.clients, "duration_s": args.duration, "wall_s": round(wall, 1),
        "served": res.served, "unfinished": res.unfinished,
        "turns_per_s": round(res.served / wall, 3) if wall else None,
        "errors": dict(res.errors),
        "first_audio_ms": {"p50": percentile(res.first_audio_ms, 50),
                           "p90": percentile(res.first_audio_ms, 90), "n": len(res.first_audio_ms)},
        "engine_first_audio_ms": {"p50": percentile(res.engine_first_audio_ms, 50),
                                  "p90": percentile(res.engine_first_audio_ms, 90)},
        "turn_ms": {"p50": percentile(res.total_ms, 50), "p90": percentile(res.total_ms, 90)},
        "server_idle_rss_mb": idle.get("rss_mb"),
        "server_peak_rss_mb": None if peak is None else round(peak, 1),
        "server_peak_rss_how": peak_how,
        "healthy_after": healthy,
    }
    errors = ", ".join(f"{k} {v}" for k, v in sorted(res.errors.items())) or "none"
    fa, efa, tm = report["first_audio_ms"], report["engine_first_audio_ms"], report["turn_ms"]
    print(f"clients {args.clients} | {args.duration:g} s (+{wall - args.duration:.1f} s to finish) "
          f"| served {res.served} turns ({report['turns_per_s']}/s) | unfinished {res.unfinished}")
    print(f"errors by kind: {errors}")
    print(f"first audio (client, from the end of the question, queue included): "
          f"p50 {fa['p50']} ms, p90 {fa['p90']} ms (n={fa['n']}); engine: p50 {efa['p50']} ms, "
          f"p90 {efa['p90']} ms")
    print(f"turn: p50 {tm['p50']} ms, p90 {tm['p90']} ms")
    print(f"server RSS: idle {report['server_idle_rss_mb']} MiB, peak "
          f"{report['server_peak_rss_mb']} MiB ({peak_how}) | healthy afterwards: "
          f"{'yes' if healthy else 'NO'}")
    if args.json:
        print(json.dumps(report))
    return 0 if healthy else 1


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
