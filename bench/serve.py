"""``python -m bench.serve [--users N] [--requests M]``: the app under load, from outside.

Starts ``app.py`` on the demo model in a subprocess on 127.0.0.1, then drives it with N concurrent
``gradio_client`` users making M ``/generate`` requests each, and reports throughput, p50/p95 latency,
refusals, errors, the server's resident memory before and after, and determinism under load (the same
seed gives the same pixels alone and among other users' requests). Results: ``bench/results/serve.json``
and ``serve.md``, with the machine and versions beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
PROMPT = "a red circle above a blue square"
PROBE_SEED = 1234  # the seed drawn alone, then by every user under load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Server:
    """``app.py`` on 127.0.0.1 in a subprocess, its log in a temp file."""

    def __init__(self, model: str, queue_size: int, threads: int, extra: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.folder = Path(tempfile.mkdtemp(prefix="pixsigma-bench-serve-"))
        self.log = (self.folder / "server.log").open("w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
               "GRADIO_ANALYTICS_ENABLED": "False"}
        cmd = [sys.executable, str(REPO / "app.py"), "--model", model, "--alpha-model", "none", "--host", "127.0.0.1",
               "--port", str(self.port), "--queue-size", str(queue_size), "--outputs", str(self.folder / "outputs"),
               *extra]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 600) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the app did not answer within {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        self.log.flush()
        return "\n".join((self.folder / "server.log").read_text().splitlines()[-n:])

    def log_text(self) -> str:
        self.log.flush()
        return (self.folder / "server.log").read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def pixels(path: str) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def drive(url: str, users: int, requests: int, steps: int | None) -> dict:
    """N users × M requests; each user's first request uses PROBE_SEED (the determinism probe)."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    records: list[dict] = []
    lock = threading.Lock()

    def user(u: int) -> None:
        client = Client(url, verbose=False)
        for r in range(requests):
            seed = PROBE_SEED if r == 0 else 10_000 + u * requests + r
            kwargs = dict(prompt=PROMPT, seed=seed, randomize_seed=False, api_name="/generate")
            if steps:
                kwargs["steps"] = steps
            start = time.monotonic()
            rec = {"user": u, "seed": seed}
            try:
                files = client.predict(**kwargs)[2]
                rec.update(outcome="ok", pixels=pixels(files[0]))
            except AppError as e:
                rec.update(outcome="refused", message=str(e)[:200])
            except Exception as e:  # queue full (QueueError), connection errors, server faults
                kind = "refused" if "queue" in type(e).__name__.lower() else "error"
                rec.update(outcome=kind, message=f"{type(e).__name__}: {str(e)[:200]}")
            rec["latency_s"] = time.monotonic() - start
            with lock:
                records.append(rec)

    start = time.monotonic()
    with ThreadPoolExecutor(users) as pool:
        list(pool.map(user, range(users)))
    return {"wall_s": time.monotonic() - start, "records": records}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def run(args: argparse.Namespace) -> dict:
    import torch
    from gradio_client import Client

    from bench.measure import environment
    from pixsigma.io import read_params

    load_start = os.getloadavg()[0]
    server = Server(args.model, max(16, args.users), args.threads, shlex.split(args.app_args or ""))
    try:
        startup_s = server.wait_ready()
        client = Client(server.url, verbose=False)
        kwargs = dict(prompt=PROMPT, seed=PROBE_SEED, randomize_seed=False, api_name="/generate")
        if args.steps:
            kwargs["steps"] = args.steps
        t0 = time.monotonic()
        alone_file = client.predict(**kwargs)[2][0]  # also warms the server up
        alone, steps = pixels(alone_file), read_params(alone_file).get("steps")
        alone_s = time.monotonic() - t0
        rss_before = rss_bytes(server.proc.pid)
        load = drive(server.url, args.users, args.requests, args.steps)
        rss_after = rss_bytes(server.proc.pid)
        log = server.log_text()
    finally:
        server.stop()
    records = load["records"]
    ok = [r for r in records if r["outcome"] == "ok"]
    latencies = sorted(r["latency_s"] for r in ok)
    probes = [r for r in ok if r["seed"] == PROBE_SEED]
    return {
        "command": shlex.join(["python", "-m", "bench.serve", *sys.argv[1:]]),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": environment(torch.device("cpu")),
        "load_average_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],  # at start, at end
        "settings": {"model": args.model, "users": args.users, "requests_per_user": args.requests,
                     "steps": steps, "server_threads": args.threads,
                     "app_args": args.app_args or ""},
        "startup_s": round(startup_s, 2),
        "alone_latency_s": round(alone_s, 3),
        "wall_s": round(load["wall_s"], 2),
        "requests": len(records),
        "served": len(ok),
        "refused": sum(r["outcome"] == "refused" for r in records),
        "errors": sum(r["outcome"] == "error" for r in records),
        "messages": sorted({r["message"] for r in records if "message" in r})[:5],
        "throughput_images_per_s": round(len(ok) / load["wall_s"], 3) if load["wall_s"] else None,
        "latency_p50_s": _round(percentile(latencies, 50)),
        "latency_p95_s": _round(percentile(latencies, 95)),
        "latency_max_s": _round(latencies[-1] if latencies else None),
        "server_rss_before_mib": round(rss_before / 2**20, 1),
        "server_rss_after_mib": round(rss_after / 2**20, 1),
        "determinism_probes": len(probes),
        "deterministic_under_load": bool(probes) and all(p["pixels"] == alone for p in probes),
        "server_tracebacks": log.count("Traceback"),
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def render(r: dict, note: str) -> str:
    env, s = r["environment"], r["settings"]
    lines = [
        "# `python -m bench.serve`: the app under load", "",
        f"Measured {r['measured_at']}: `{r['command']}`", "",
        "| device | CPU | CPU count | torch | diffusers | transformers | python |",
        "|---|---|---|---|---|---|---|",
        f"| {env['device_type']} | {env.get('device_name', '')} | {env['cpu_count']} | {env['torch']} | "
        f"{env['diffusers']} | {env['transformers']} | {env['python']} |", "",
        f"Model `{s['model']}` on the CPU ({s['server_threads']} thread(s) in the server), {s['users']} concurrent "
        f"gradio_client users × {s['requests_per_user']} requests, {s['steps']} steps each; one request runs at a "
        f"time per device, the rest wait in the queue.", "",
        "| measure | value |", "|---|---|",
        f"| requests served / refused / errors | {r['served']} / {r['refused']} / {r['errors']} of {r['requests']} |",
        f"| throughput | {r['throughput_images_per_s']} images/s ({r['wall_s']} s in all) |",
        f"| latency p50 / p95 / max (incl. queueing) | {r['latency_p50_s']} / {r['latency_p95_s']} / "
        f"{r['latency_max_s']} s |",
        f"| one request alone (first, warm-up) | {r['alone_latency_s']} s |",
        f"| server RSS before / after the load | {r['server_rss_before_mib']} / {r['server_rss_after_mib']} MiB |",
        f"| same seed alone and under load: identical pixels | {r['deterministic_under_load']} "
        f"({r['determinism_probes']} probes) |",
        f"| tracebacks in the server log | {r['server_tracebacks']} |",
        f"| app start-up (to first HTTP answer) | {r['startup_s']} s |",
        f"| CPU load average (1 min) at start / end | {r['load_average_1min'][0]} / {r['load_average_1min'][1]} "
        f"on {env['cpu_count']} cores |", "",
    ]
    if note:
        lines += [f"Note: {note}", ""]
    if r["messages"]:
        lines += ["Refusal / error messages seen:", "", *[f"- {m}" for m in r["messages"]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=4, help="concurrent gradio_client users")
    p.add_argument("--requests", type=int, default=3, help="requests per user")
    p.add_argument("--model", default="demo", help="what the app serves (--model of app.py)")
    p.add_argument("--steps", type=int, default=None, help="steps per request (default: the model's own)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the server")
    p.add_argument("--app-args", default="", help="more app.py options, e.g. '--devices cpu,cpu'")
    p.add_argument("--note", default="", help="a line written under the table (e.g. the machine was shared)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args(argv)
    if args.users < 1 or args.requests < 1:
        p.error(f"--users and --requests must be >= 1, got {args.users} and {args.requests}")
    from pixsigma.io import atomic_write

    result = run(args)
    result["note"] = args.note
    json_path, md_path = args.out / "serve.json", args.out / "serve.md"
    atomic_write(json_path, lambda t: Path(t).write_text(json.dumps(result, indent=2) + "\n"))
    atomic_write(md_path, lambda t: Path(t).write_text(render(result, args.note)))
    print(render(result, args.note))
    print(f"wrote {json_path} and {md_path}")
    return 0 if result["errors"] == 0 and result["deterministic_under_load"] else 1


if __name__ == "__main__":
    sys.exit(main())
