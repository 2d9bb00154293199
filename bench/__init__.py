"""pixsigma's benchmark suite: DiT latency and whole-image latency against diffusers, in one run.

Run ``python -m bench`` (see bench/README.md); nothing here runs at import.
"""
