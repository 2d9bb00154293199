"""A folder's own settings, ``sampling.json``: how this model (or adapter) wants to be sampled and prompted.

pixsigma's file (diffusers ignores it), written next to ``scheduler/``: the steps and guidance that go with
the folder's own sampler, and optionally a prompt expander, a rewrite of what the user typed into the kind
of caption the model was trained on. A LoRA folder may hold one too, beside its weights: a few-step
(consistency) adapter names its sampler, steps and guidance there, and they win over the model's while it is
applied (``with_adapters``). A request's own values always win.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pixsigma.constants import DEFAULT_GUIDANCE, DEFAULT_STEPS
from pixsigma.io import atomic_write_text
from pixsigma.lora import resolve_lora
from pixsigma.registry import check_expander
from pixsigma.sampling import DEFAULT_STEPS_FOR, SAMPLERS

SAMPLING_FILE = "sampling.json"  # a folder's steps, guidance and prompt expander (pixsigma's; diffusers ignores it)


def check_sampling(steps: int | None, guidance: float | None) -> None:
    """Steps and guidance as a request or a folder's ``sampling.json`` gives them (None: unset)."""
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1 or null, got {steps!r}")
    if guidance is not None and (not isinstance(guidance, int | float) or isinstance(guidance, bool)
                                 or not 0 <= guidance < math.inf):
        raise ValueError(f"guidance must be a number >= 0 and finite (1 = no guidance; PixArt's default "
                         f"{DEFAULT_GUIDANCE}) or null (the default), got {guidance!r}")


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves steps or guidance unset gets for this model. The sampler itself is the
    folder's ``scheduler/`` (the ``default`` sampler); these two numbers go with it. ``prompt_expander``
    names how the model wants to be prompted: a rewrite of short prompts into the dense captions it was
    trained on (``pixsigma.registry``), applied unless a request turns it off."""

    steps: int | None = None  # None: the sampler's own (DEFAULT_STEPS_FOR)
    guidance: float | None = None  # None: DEFAULT_GUIDANCE
    prompt_expander: str | None = None  # None: prompts go to the text encoder as typed
    sampler: str | None = None  # None: the folder's own scheduler (``default``); e.g. "lcm" for a few-step adapter

    def __post_init__(self) -> None:
        check_sampling(self.steps, self.guidance)
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)} or null (the folder's scheduler), "
                             f"got {self.sampler!r}")
        if self.prompt_expander is not None:
            check_expander(self.prompt_expander)

    @classmethod
    def read(cls, folder: Path) -> SamplingDefaults:
        """The folder's ``sampling.json`` ({"steps": 30, "guidance": 2.0}), else PixArt's (20 steps, 4.5)."""
        path = folder / SAMPLING_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f'{path} must hold an object like {{"steps": 30, "guidance": 2.0}}, got {data!r}')
        accepted = [f.name for f in fields(cls)]
        unknown = set(data) - set(accepted)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; accepted: {', '.join(accepted)}")
        try:
            return cls(**data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def write(self, folder: Path) -> None:
        body = json.dumps(asdict(self), indent=1)
        atomic_write_text(folder / SAMPLING_FILE, body + "\n")

    def with_adapters(self, adapters: list[SamplingDefaults]) -> SamplingDefaults:
        """These defaults under the applied adapters' own: each set field of a later adapter wins."""
        out = asdict(self)
        for a in adapters:
            out.update({k: v for k, v in asdict(a).items() if v is not None})
        return SamplingDefaults(**out)

    def resolve(self, sampler: str | None, steps: int | None, guidance: float | None) -> tuple[str, int, float]:
        """(sampler, steps, guidance) a request with these values runs (None: unset): its own, else these
        defaults (their steps go with their own sampler only), else the sampler's steps and DEFAULT_GUIDANCE."""
        own = sampler in (None, "default") or sampler == self.sampler
        name = (self.sampler or "default") if sampler in (None, "default") else sampler
        n = steps or (self.steps if own and self.steps else None) or DEFAULT_STEPS_FOR.get(name, DEFAULT_STEPS)
        g = next(v for v in (guidance, self.guidance, DEFAULT_GUIDANCE) if v is not None)
        return name, n, float(g)



def adapter_sampling(lora: str | Path) -> SamplingDefaults:
    """The ``sampling.json`` beside a LoRA's weights (an alias, a file or a folder), else no settings."""
    return SamplingDefaults.read(resolve_lora(lora)[0].parent)
