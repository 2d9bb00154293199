"""The model a Generate or Compare request runs on: the shipped Σ (``main``), the shipped α (``alpha``) or a
finished training run (``run:NAME``, :mod:`pixsigma_ui.run_models`), as a dropdown, as the ``model`` parameter of
``/generate`` and ``/compare``, and as the ``/runs`` endpoint listing the finished runs.
"""

from __future__ import annotations

import reprlib
from typing import Any

import gradio as gr

from pixsigma_ui.engine import ALPHA, MAIN, AppEngine
from pixsigma_ui.inputs import as_text, guarded
from pixsigma_ui.run_models import RUN_PREFIX


def shipped_choices(engine: AppEngine) -> list[tuple[str, str]]:
    out = [(f"PixArt-Σ: {engine.names[MAIN]}", MAIN)]
    if engine.has(ALPHA):
        out.append((f"PixArt-α: {engine.names[ALPHA]}", ALPHA))
    return out


def run_choices(engine: AppEngine) -> list[tuple[str, str]]:
    runs = engine.runs.choices() if engine.runs is not None else []
    return [(r.label, r.key) for r in runs]


def model_choices(engine: AppEngine) -> list[tuple[str, str]]:
    """(label, value) pairs: the shipped models, then the finished runs, newest first."""
    return shipped_choices(engine) + run_choices(engine)


def check_model(engine: AppEngine, model: Any, allow_alpha: bool = True) -> str:
    """``model`` as a key the engine serves (a run is loaded now if it is not yet; empty: ``main``), or a
    ValueError saying which are accepted."""
    model = as_text(model, "model").strip() or MAIN
    if model == MAIN or (model == ALPHA and allow_alpha and engine.has(ALPHA)):
        return model
    if model.startswith(RUN_PREFIX) and engine.runs is not None:
        engine.info(model)  # loads it, or refuses naming the finished runs
        return model
    accepted = [MAIN] + ([ALPHA] if allow_alpha and engine.has(ALPHA) else []) + [k for _, k in run_choices(engine)]
    raise ValueError(f"model {reprlib.repr(model)} is not offered; accepted: {', '.join(accepted[:12])} "
                     "(finished runs are listed by /runs)")


def check_run(engine: AppEngine, model: Any) -> str:
    """Compare's ``model``: empty (no run panel) or a finished run's key."""
    model = as_text(model, "model").strip()
    if not model:
        return ""
    if not model.startswith(RUN_PREFIX):
        runs = ", ".join(k for _, k in run_choices(engine)[:10]) or "none yet"
        raise ValueError(f"model {reprlib.repr(model)}: Compare's model is a finished run (run:NAME, listed by "
                         f"/runs) or empty; finished runs: {runs}")
    return check_model(engine, model)


def run_panel(engine: AppEngine, run: str, done: dict[str, Any]) -> Any:
    """Compare's run panel: the run's image labelled with its name and latency, once it is drawn."""
    d = done.get("run")
    if not run or d is None:
        return gr.skip()
    r = d.result
    return gr.Image(r.images[0], label=f"{engine.names[run]} · {r.width}×{r.height} · {r.seconds:.2f} s",
                    format="png")  # lossless: the pixels the run drew


def resolution_for(engine: AppEngine, model: str, resolution: int, default: int) -> int:
    """The request's base resolution on ``model``: left at the main model's default and not offered for
    ``model`` (a run trained at another size), it is that model's own."""
    info = engine.info(model)
    return info.resolution if resolution == default and resolution not in info.resolutions else resolution


def list_runs(engine: AppEngine) -> list[dict[str, Any]]:
    """The ``/runs`` endpoint: every finished run, newest first, with the ``model`` value that selects it."""
    return [r.as_dict() for r in (engine.runs.choices() if engine.runs is not None else [])]


NO_RUN = ("none", "")


def build_model_picker(engine: AppEngine, elem_id: str, label: str = "Model", runs_only: bool = False) -> gr.Dropdown:
    """The dropdown (``runs_only``: "none" or a finished run); its choices are read again on every page load, so
    a run that finished since shows up."""
    def choices() -> list[tuple[str, str]]:
        return [NO_RUN, *run_choices(engine)] if runs_only else model_choices(engine)

    default = NO_RUN[1] if runs_only else MAIN
    picker = gr.Dropdown(choices(), value=default, label=label, elem_id=elem_id,
                         info="your finished training runs (a run's final/)" if runs_only else
                         "the shipped models, and your finished training runs (a run's final/)")

    def refresh(current: str | None) -> gr.Dropdown:
        now = choices()
        return gr.Dropdown(choices=now, value=current if current in {v for _, v in now} else default)

    root = gr.context.Context.root_block
    if root is not None:
        root.load(refresh, picker, picker, queue=False, api_visibility="private")
    return picker


def link_resolution(engine: AppEngine, picker: gr.Dropdown, resolution: gr.Dropdown) -> None:
    """Picking a model offers its resolutions and selects its own (a run trained at 128 px draws at 128 px)."""
    def own(model: str) -> Any:
        try:
            info = engine.info(check_model(engine, model))  # a run is loaded now, not at the first Generate
        except ValueError:
            return gr.skip()
        return gr.Dropdown(choices=list(info.resolutions), value=info.resolution)

    picker.change(own, picker, resolution, queue=False, api_visibility="private")


def build_runs_api(engine: AppEngine) -> None:
    """``/runs``: a hidden button wired to :func:`list_runs` (gradio_client ``predict(api_name="/runs")``)."""
    out = gr.JSON(visible=False)
    button = gr.Button(visible=False)
    button.click(guarded(lambda: list_runs(engine)), None, out, api_name="runs", queue=False)
