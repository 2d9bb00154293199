"""Several devices: one :class:`AppEngine` per device, each request on the least busy one.

The pool is an :class:`AppEngine` to the tabs: requests are validated against the first engine (all hold the
same models, under the strictest of their limits) and run on whichever engine has the fewest requests in hand,
so with the queue's concurrency equal to the number of devices every device works.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from pixsigma.pipeline import GenerationRequest
from pixsigma_ui.engine import MAIN, AppEngine, Done, Limits, Step


def common_limits(limits: list[Limits]) -> Limits:
    """The per-request caps every device can honour."""
    return Limits(**{k: min(getattr(lim, k) for lim in limits)
                     for k in ("max_steps", "max_images", "max_resolution", "max_pixels")})


class EnginePool(AppEngine):
    """``engines``: one per device, each with the same models (names and configs)."""

    def __init__(self, engines: list[AppEngine]) -> None:
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        first = engines[0]
        for e in engines[1:]:
            if e.names != first.names or e._configs != first._configs:
                raise ValueError(f"every engine of a pool must hold the same models; got {first.names} and {e.names}")
        limits = common_limits([e.limits for e in engines])
        for e in engines:
            e.limits = limits
        super().__init__(first.pipes, first.names, limits)
        self.engines = list(engines)
        self._busy = [0] * len(engines)
        self._pick_lock = threading.Lock()

    @classmethod
    def load_on(cls, devices: list[str], model: str, alpha_model: str | None = None, dtype: str | None = None,
                offload_t5: bool = False, t5_precision: str | None = None) -> EnginePool:
        """The models loaded once per device (``devices`` may repeat one, e.g. two CPU engines in tests)."""
        return cls([AppEngine.load(model, alpha_model, device=d, dtype=dtype, offload_t5=offload_t5,
                                   t5_precision=t5_precision) for d in devices])

    @property
    def concurrency(self) -> int:
        return sum(e.concurrency for e in self.engines)

    @property
    def devices(self) -> list[str]:
        return [d for e in self.engines for d in e.devices]

    @property
    def device_key(self) -> str:
        return "devices:" + ",".join(self.devices)

    def _take(self) -> int:
        with self._pick_lock:
            i = min(range(len(self.engines)), key=self._busy.__getitem__)
            self._busy[i] += 1
            return i

    def _give(self, i: int) -> None:
        with self._pick_lock:
            self._busy[i] -= 1

    def unknown_words(self, prompt: str, model: str = MAIN) -> list[str]:
        i = self._take()
        try:
            return self.engines[i].unknown_words(prompt, model)
        finally:
            self._give(i)

    def stream(self, request: GenerationRequest, model: str = MAIN,
               preview_every: int = 0) -> Iterator[Step | Done]:
        i = self._take()
        try:
            yield from self.engines[i].stream(request, model, preview_every)
        finally:
            self._give(i)

