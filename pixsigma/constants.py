"""Numbers the whole package shares, defined once."""

MAX_TOKENS = 300  # T5 tokens PixArt-Σ attends to (PixArt-α used 120)
DEFAULT_GUIDANCE = 4.5  # classifier-free guidance scale of the released samplers
DEFAULT_STEPS = 20  # DPM-Solver++ steps of the released samplers
NUM_TRAIN_TIMESTEPS = 1000  # linear-β DDPM the models were trained with
VAE_SCALE_FACTOR = 8  # pixels per latent cell of every PixArt VAE
SIZE_MULTIPLE = 16  # VAE factor × patch size: the smallest step an image side can take
TILED_DECODE_FROM = 2048  # decode the VAE in tiles from this many pixels (long side) up
PARAMS_CHUNK = "parameters"  # PNG text chunk holding the generation parameters
# How a consistency-distilled (LCM) model samples: what its sampling.json names (docs/fewstep.md)
FEW_STEP_SAMPLING = {"sampler": "lcm", "steps": 4, "guidance": 1.0}
DTYPE_NAMES = ("fp32", "bf16", "fp16")  # what --dtype / from_pretrained(dtype=) accept (pipeline.DTYPES maps them)
