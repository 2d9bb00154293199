"""The request stack, in the one direction a request runs (``PixSigmaPipeline._generate`` composes it):

1. ``scope``: the request's state on the pipeline (LoRAs and scales, KV override, the ControlNet's KV), restored
   exactly on success, error or cancel;
2. ``conditioning``: text (prompts or given T5 features, with the negatives for guidance) and micro-conditions;
3. ``latents``: the schedule and the start (the seed's or given noise; image-to-image / inpainting start part way);
4. ``denoiser``: the DiT (adapters live on its Linears), ``control``'s residuals at block level, ``guidance``
   (CFG, guidance interval) around them: one callable ``(x, t) -> prediction``;
5. ``loop``: the bare sampler loop with the edit hook and the step callback; then the pipeline decodes.

Each module is one layer; a new feature adds a layer here and touches no other.
"""
