"""``python -m train CONFIG [--resume] [--set key=value ...]`` (or ``accelerate launch -m train CONFIG``)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    from .config import load_config
    from .loop import train

    ap = argparse.ArgumentParser(prog="python -m train", description="Train a PixArt-Σ stage (see configs/).")
    ap.add_argument("config", help="a training config: .yaml, or .py defining `config`")
    ap.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, dotted for nested ones: --set optim.lr=1e-4 --set steps=10")
    args = ap.parse_args(argv)
    result = train(load_config(args.config, args.overrides), resume=args.resume)
    print(f"[train] {result['state']} at step {result['step']}: {result['run_dir']}")


if __name__ == "__main__":
    main()
