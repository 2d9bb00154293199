"""Frozen, validated configs for the PixArt DiT and its KV token compression.

Every checkpoint stores ``asdict(config)``; models are rebuilt only through
``DiTConfig.from_dict`` so a checkpoint always says exactly what it is.
"""

from __future__ import annotations

import reprlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

KV_OPERATORS = ("conv", "pool", "discard")
# What the first in_channels outputs are (diffusers' names): the noise ε (PixArt), or v = √ᾱ·ε − √(1−ᾱ)·x₀.
PREDICTION_TYPES = ("epsilon", "v_prediction")
MAX_DEPTH = 1024  # far beyond any DiT; bounds a layer range before it is expanded
MAX_LAYERS_SPEC_CHARS = 1000  # far beyond any real spec (all 28 layers of an XL model listed one by one: 80)


@dataclass(frozen=True)
class KVCompress:
    """The paper's KV token compression (Sec. 3.2).

    ``ratio`` R merges keys/values over R×R windows of the token grid in the
    self-attention of ``layers``; queries stay whole. ``operator``:
    ``conv``  depthwise Conv2d(kernel=R, stride=R) initialised to the average, then LayerNorm (the paper's choice);
    ``pool``  plain R×R average pooling (ablation, no parameters);
    ``discard`` keep the top-left token of each window (uniform token discarding, ablation).
    ``ratio == 1`` (or no layers) is exactly full attention.
    """

    ratio: int = 1
    layers: tuple[int, ...] = ()
    operator: str = "conv"

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, int) or isinstance(self.ratio, bool) or self.ratio < 1:
            raise ValueError(f"KV compression ratio must be an integer >= 1 (1 = off), got {self.ratio!r}")
        if self.operator not in KV_OPERATORS:
            raise ValueError(f"KV compression operator must be one of {KV_OPERATORS}, got {self.operator!r}")
        layers = tuple(int(i) for i in self.layers)
        if any(i < 0 for i in layers):
            raise ValueError(f"KV compression layers must be >= 0, got {layers}")
        object.__setattr__(self, "layers", tuple(sorted(set(layers))))

    @property
    def active(self) -> bool:
        return self.ratio > 1 and bool(self.layers)

    def ratio_for(self, layer: int) -> int:
        """R for block ``layer`` (1 where it is not compressed)."""
        return self.ratio if layer in self.layers else 1


def check_fields(cls: type, d: dict[str, Any], what: str) -> None:
    """A ValueError naming ``d``'s keys that are not fields of the dataclass ``cls`` (and the accepted ones)."""
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; accepted: {sorted(known)}")


def parse_layers(spec: str, depth: int = MAX_DEPTH) -> tuple[int, ...]:
    """'14-27' or '14,15,20-22' -> layer indices, each below ``depth``. Raises ValueError naming the bad part.

    Bounds are checked before a range is expanded, so a short spec can never ask for millions of layers."""
    text = str(spec)
    if len(text) > MAX_LAYERS_SPEC_CHARS:
        raise ValueError(f"KV compression layers spec is {len(text)} characters long; at most "
                         f"{MAX_LAYERS_SPEC_CHARS} are accepted, e.g. '14-27'")
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            a, b = (int(x) for x in part.split("-", 1)) if "-" in part[1:] else (int(part), int(part))
            if b < a or a < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"bad layer range {reprlib.repr(part)} in {reprlib.repr(text)}: use 'A-B' or "
                             "'A,B,C' with 0 <= A <= B, e.g. '14-27'") from None
        if b >= depth:
            raise ValueError(f"KV compression layers {reprlib.repr(part)} do not exist: this model has layers "
                             f"0-{depth - 1}")
        out.extend(range(a, b + 1))
    return tuple(out)


@dataclass(frozen=True)
class DiTConfig:
    """PixArt-α/Σ DiT (PixArtMS). Defaults are XL/2 at 1024 px (the released PixArt-Σ).

    ``sample_size`` is the latent side of the base resolution (1024 px -> 128); the
    positional grid is ``arange(n) / (n / base_size) / pe_interpolation`` with
    ``base_size = sample_size // patch_size``.
    """

    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8  # ε and the learned variance
    caption_channels: int = 4096
    max_tokens: int = 300
    mlp_ratio: float = 4.0
    sample_size: int = 128
    pe_interpolation: float = 2.0
    micro_condition: bool = False  # PixArt-α 1024: resolution/aspect-ratio embedders
    kv_compress: KVCompress = field(default_factory=KVCompress)
    # A property of the weights, so it travels with them (the sampler reads it from here, not from a folder).
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "out_channels",
                     "caption_channels", "max_tokens", "sample_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DiTConfig.{name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head dim must be even")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 for 2D sin-cos positions, got {self.hidden_size}")
        if self.out_channels not in (self.in_channels, 2 * self.in_channels):
            raise ValueError(f"out_channels must be in_channels ({self.in_channels}) or twice it (learned variance), "
                             f"got {self.out_channels}")
        if self.sample_size % self.patch_size:
            raise ValueError(f"sample_size {self.sample_size} is not divisible by patch_size {self.patch_size}")
        if not self.pe_interpolation > 0:
            raise ValueError(f"pe_interpolation must be > 0, got {self.pe_interpolation}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if isinstance(self.kv_compress, dict):
            object.__setattr__(self, "kv_compress", KVCompress(**self.kv_compress))
        bad = [i for i in self.kv_compress.layers if i >= self.depth]
        if bad:
            raise ValueError(f"KV compression layers {bad} do not exist: the model has layers 0-{self.depth - 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def base_size(self) -> int:
        return self.sample_size // self.patch_size

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    @property
    def resolution(self) -> int:
        """Base image resolution in pixels (VAE f = 8)."""
        return self.sample_size * 8

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kv_compress"]["layers"] = list(d["kv_compress"]["layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiTConfig:
        check_fields(cls, d, "DiTConfig fields")
        d = dict(d)
        if "kv_compress" in d and isinstance(d["kv_compress"], dict):
            d["kv_compress"] = KVCompress(**d["kv_compress"])
        return cls(**d)

    def with_kv(self, kv: KVCompress) -> DiTConfig:
        return replace(self, kv_compress=kv)

    def at_resolution(self, resolution: int) -> DiTConfig:
        """Same model, base size and PE interpolation for another base resolution (the res-up stage)."""
        if resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
        scale = resolution / self.resolution
        return replace(self, sample_size=resolution // 8, pe_interpolation=self.pe_interpolation * scale)


def pe_interpolation_for(resolution: int) -> float:
    """The paper's PE interpolation for a base resolution: 256->0.5, 512->1, 1024->2, 2048->4, 4096->8."""
    return resolution / 512


def default_kv(depth: int, ratio: int = 2, operator: str = "conv") -> KVCompress:
    """The paper's KV setting for a ``depth``-block model: R = 2 conv on the deep half of the blocks (14-27 of
    XL's 28); ``ratio``/``operator`` keep that placement with another R or operator."""
    return KVCompress(ratio=ratio, layers=tuple(range(depth // 2, depth)), operator=operator)


_XL = dict(depth=28, hidden_size=1152, num_heads=16)
_DEEP_HALF_XL = default_kv(_XL["depth"])

PRESETS: dict[str, DiTConfig] = {
    # The released PixArt-Σ / α models (PixArtMS XL/2).
    "XL_2_256": DiTConfig(**_XL, sample_size=32, pe_interpolation=0.5),
    "XL_2_512": DiTConfig(**_XL, sample_size=64, pe_interpolation=1.0),
    "XL_2_1024": DiTConfig(**_XL, sample_size=128, pe_interpolation=2.0),
    "XL_2_2K": DiTConfig(**_XL, sample_size=256, pe_interpolation=4.0),
    "XL_2_4K": DiTConfig(**_XL, sample_size=512, pe_interpolation=8.0),
    "XL_2_1024_KV": DiTConfig(**_XL, sample_size=128, pe_interpolation=2.0, kv_compress=_DEEP_HALF_XL),
    "XL_2_2K_KV": DiTConfig(**_XL, sample_size=256, pe_interpolation=4.0, kv_compress=_DEEP_HALF_XL),
    "XL_2_4K_KV": DiTConfig(**_XL, sample_size=512, pe_interpolation=8.0, kv_compress=_DEEP_HALF_XL),
    # The shipped "shapes" demo (see shapes); small enough for a CPU. v-prediction: with ε a model
    # this small cannot output ε to the ~1e-2 precision that x₀ = (x_t − √(1−ᾱ)·ε)/√ᾱ needs at high noise
    # (√ᾱ ≈ 0.02 at t = 900), so its early sampler steps (where layout and colour are decided) drift.
    "demo": DiTConfig(depth=8, hidden_size=192, num_heads=4, caption_channels=128, max_tokens=80,
                      sample_size=16, pe_interpolation=0.25, prediction_type="v_prediction"),
    # Unit tests.
    "tiny": DiTConfig(depth=2, hidden_size=32, num_heads=2, caption_channels=16, max_tokens=16,
                      sample_size=8, pe_interpolation=1.0),
}
