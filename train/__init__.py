"""Training for pixsigma: PixArt-Σ's weak-to-strong stages on one shared loop.

``python -m train CONFIG`` runs a stage (``from_scratch``, ``vae_adapt``, ``res_up``, ``kv_compress``,
``finetune``; see ``train.stages``); ``python -m train.extract CONFIG`` pre-computes its T5/VAE features.
Importing this package loads nothing heavy; use ``train.loop.train`` and ``train.config.load_config``.
"""
