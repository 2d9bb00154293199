"""``python -m bench [--device cuda|cpu] [--sizes 1024,2048,4096] [--quick] …`` — see bench/README.md."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    from bench.plan import PARTS
    from pixsigma.speed import MODES

    p = argparse.ArgumentParser(prog="python -m bench", description="pixsigma vs diffusers, side by side in one run.")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--sizes", help="comma-separated square sides in px (default: 1024,2048,4096 on a GPU, 256 on "
                   "a CPU, 64,128 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny random models and few repeats: a smoke test")
    p.add_argument("--modes", help=f"pixsigma speed modes to time, from {','.join(MODES)} (default: all on a GPU, "
                   "eager,sdpa on a CPU)")
    p.add_argument("--e2e-mode", choices=MODES, help="speed mode of the whole-image runs (default: compile on a GPU, "
                   "eager on a CPU)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"what to run, from {','.join(PARTS)}")
    p.add_argument("--steps", type=int, default=20, help="sampling steps of the whole-image runs")
    p.add_argument("--threads", type=int, help="CPU threads (default: 2 on a CPU run — the target machine)")
    p.add_argument("--out", type=Path, help=f"results folder (default: {RESULTS}, or {RESULTS / 'quick'} with "
                   "--quick)")
    p.add_argument("--allow-partial", action="store_true", help="write results even if some measurement failed "
                   "(failed rows say 'not measured: reason'); otherwise such a run writes nothing and exits 1")
    return p


def _ints(spec: str | None) -> tuple[int, ...]:
    if not spec:
        return ()
    try:
        return tuple(int(s) for s in spec.split(",") if s.strip())
    except ValueError:
        raise SystemExit(f"--sizes takes comma-separated integers such as 1024,2048,4096, got {spec!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from bench.plan import BenchFailed, BenchSettings
    from bench.report import save
    from bench.run import run_bench

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every part is built in memory; nothing may download
    cpu_run = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if args.threads or cpu_run:
        torch.set_num_threads(args.threads or 2)
    try:
        settings = BenchSettings(device=args.device, sizes=_ints(args.sizes), quick=args.quick,
                                 modes=tuple(m for m in (args.modes or "").split(",") if m),
                                 parts=tuple(x for x in args.parts.split(",") if x), e2e_mode=args.e2e_mode,
                                 allow_partial=args.allow_partial, steps=args.steps)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run = run_bench(settings, shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]))
    except BenchFailed as e:
        print("bench FAILED, no results written:", file=sys.stderr)
        for reason in e.reasons:
            print(f"  - {reason}", file=sys.stderr)
        return 1
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    json_path, md_path = save(run, out)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
