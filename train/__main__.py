"""``python -m train CONFIG [--resume] [--set key=value ...]`` (or ``accelerate launch -m train CONFIG``)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    from .config import load_config
    from .loop import train
    from .runlock import exit_if_busy, is_main_rank

    ap = argparse.ArgumentParser(prog="python -m train", description="Train a PixArt-Σ stage (see configs/).")
    ap.add_argument("config", help="a training config: .yaml, or .py defining `config`")
    ap.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, dotted for nested ones: --set optim.lr=1e-4 --set steps=10")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if is_main_rank():  # the run folder is this process's until it exits; a second trainer there exits at once
        exit_if_busy(cfg.run_dir, doing="training")
    result = train(cfg, resume=args.resume)
    print(f"[train] {result['state']} at step {result['step']}: {result['run_dir']}")


if __name__ == "__main__":
    main()
