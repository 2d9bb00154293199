"""The Train tab's lab: the weak-to-strong chain drawn as its stages (α → VAE → res-up → KV → finetune), each with
its state, progress (step, steps/s, ETA), loss curve, latest validation images and ShapesBench score as it
arrives, and the chain's Start, Stop and Resume (``RunManager.start_chain``, ``train.chain.stop_chain``).

Everything shown is read from the run folders on every poll (:mod:`pixsigma_ui.lab_state`,
``train.chain.chain_status``), never kept in memory: a reload, a second browser or a restarted app sees the same
runs. A stage box shows that stage's most recent run, the chain's (``RUNS/lab/NAME``) or one started alone from
the form under the lab.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from pixsigma.layout import CHECKOUT, DATA_ROOT
from pixsigma_ui.inputs import as_text, guarded
from pixsigma_ui.lab_state import (
    CHAIN_STAGES,
    SCORE_KEYS,
    StageView,
    config_stage,
    lab_view,
    metrics_frame,
    read_metrics,
)

if CHECKOUT is not None:  # a clone imports train/ by its name; a wheel has it as pixsigma.train (pixsigma.layout)
    from train.chain import PRESETS, STARTS, chain_status, stop_chain
else:
    from pixsigma.train.chain import PRESETS, STARTS, chain_status, stop_chain

POLL_SECONDS = 2.0
PRESET_HELP = ("tiny: seconds, a smoke test · quick: about 20 minutes on 2 CPU cores · quick-fast: quick, then the "
               "consistency stage (4-step Σ) · full: the shipped pair's recipe, then the consistency stage")
STAGE_HELP = {"from_scratch": "α: the weak model (shipped, or trained from scratch)",
              "vae_adapt": "VAE swap: α learns VAE-σ's latent space (128 px)",
              "res_up": "128 → 256 px, position embeddings interpolated",
              "kv_compress": "KV compression: keys and values pooled 2×2 in deep layers",
              "finetune": "fine-tune the loaded model (the form below; your data or the shapes world)",
              "consistency": "few-step Σ: distilled to 4 LCM steps without guidance (docs/fewstep.md)"}


def score_line(score: dict[str, Any] | None) -> str:
    """'ShapesBench **0.412** (count 0.5 · colour 0.6 · …, n=48)', or a dash before a score arrives."""
    if not score or not isinstance(score.get("attribute"), int | float):
        return "ShapesBench —"
    parts = " · ".join(f"{k} {score[k]:.2f}" for k in SCORE_KEYS[1:] if isinstance(score.get(k), int | float))
    n = f", n={score['n']}" if isinstance(score.get("n"), int) else ""
    return f"ShapesBench **{score['attribute']:.3f}** ({parts}{n})"


def stage_text(sv: StageView) -> str:
    """A stage box's text: title, state, progress, loss, score, run folder, error."""
    lines = [f"### {sv.title}", f"<small>{STAGE_HELP.get(sv.stage, sv.stage)}</small>", ""]
    run = sv.run
    if run is None:
        lines.append("**shipped** · the demo α, scored, not trained" if sv.shipped else "**not started**")
    else:
        state = run.state + (" (stop requested)" if run.stopping else "")
        lines.append(f"**{state}** · {run.progress}")
        if run.last_loss is not None:
            lines.append(f"loss {run.last_loss:.4f}")
        lines.append(f"run `{run.name}`" + (" · exported: pick it in Generate and Compare" if run.finished else ""))
        if run.error:
            lines.append(f"error: {run.error}")
    lines.append(score_line(sv.score))
    return "\n\n".join(lines)


def chain_line(status: dict[str, Any]) -> str:
    """The chain's header: its state, preset, α's source and current stage."""
    if status.get("state") in (None, "none"):
        return ("No chain yet: pick a preset and press **Start chain** (inputs are made on demand: world images, "
                "features and starting weights), or start one stage with the form below.")
    parts = [f"**Chain** ({status.get('preset')}, α {status.get('start_from')}): **{status['state']}**"]
    if status.get("current") and status["state"] == "running":
        parts.append(f"stage {status['current']}")
    done = [s["name"] for s in status.get("stages", []) if s.get("state") == "done"]
    if done:
        parts.append(f"done: {', '.join(done)}")
    if status.get("error"):
        parts.append(f"error: {status['error']}")
    if status.get("chain_json"):
        parts.append(f"scores in `{status['chain_json']}`")
    return " · ".join(parts)


def plan_name(preset: str, start_from: str, stage: str) -> str:
    """The run name the chain's plan gives trainer stage ``stage`` (ValueError: the preset has no such stage)."""
    if CHECKOUT is not None:
        from train.worlds import DEFAULT_WORLD, load_world
    else:
        from pixsigma.train.worlds import DEFAULT_WORLD, load_world

    plan = load_world(DEFAULT_WORLD).preset(preset, start_from).plan
    for st in plan:
        if config_stage(DATA_ROOT / "configs" / st.config) == stage:
            return st.name
    raise ValueError(f"the {preset} chain has no {stage} stage; its stages: {', '.join(st.name for st in plan)}")


def build_lab(manager: Any) -> None:
    """The lab's components and events (inside the Train tab); ``manager``: the tab's ``RunManager``."""
    lab_dir = manager.lab_dir
    gr.Markdown("## The weak-to-strong lab\nPixArt-Σ's idea: a weak model made strong in short stages, each "
                "converging in a few hundred steps. Each stage below shows its latest run; scores are ShapesBench's "
                "(the same held-out prompts and seeds at every point).")
    with gr.Row():
        preset = gr.Dropdown(list(PRESETS), value="quick", label="Chain preset", info=PRESET_HELP,
                             elem_id="lab-preset")
        start_from = gr.Radio(list(STARTS), value="shipped", label="α", info="the shipped α, or α from scratch",
                              elem_id="lab-from")
        with gr.Column(min_width=160):
            start = gr.Button("Start chain", variant="primary", elem_id="lab-start")
            stop = gr.Button("Stop chain", variant="stop", elem_id="lab-stop")
            resume = gr.Button("Resume chain", elem_id="lab-resume")
    header = gr.Markdown(elem_id="lab-chain")
    boxes: list[tuple[gr.Markdown, gr.LinePlot, gr.Gallery]] = []
    stage_buttons: dict[str, gr.Button] = {}
    with gr.Row(equal_height=False):
        for title, stage in CHAIN_STAGES:
            with gr.Column(min_width=200, elem_id=f"lab-{stage}"):
                if stage != "finetune":  # finetune: the form under the lab
                    stage_buttons[stage] = gr.Button(f"Start {title}", size="sm", elem_id=f"lab-{stage}-start")
                boxes.append((gr.Markdown(elem_id=f"lab-{stage}-state"),
                              gr.LinePlot(x="step", y="loss", title=f"{title} loss", height=170,
                                          elem_id=f"lab-{stage}-loss"),
                              gr.Gallery(label="validation", columns=2, height=130, object_fit="contain",
                                         elem_id=f"lab-{stage}-samples")))
    figure = gr.Image(label="ShapesBench against steps, one curve per stage (the paper's Fig. 8)", visible=False,
                      elem_id="lab-figure")
    shown = gr.State({})  # what this page already draws: unchanged plots and galleries are not sent again

    def refresh(seen: dict[str, Any]) -> list[Any]:
        status = chain_status(lab_dir)
        view = lab_view(manager.runs_dir, lab_dir)
        out: list[Any] = [chain_line(status)]
        plot = status.get("plot")
        out.append(gr.Image(value=plot, visible=True) if plot and seen.get("plot") != plot else gr.skip())
        seen = {**seen, "plot": plot or seen.get("plot")}
        for sv in view.stages:
            run = sv.run
            out.append(stage_text(sv))
            key = (run.name, run.step) if run else None
            if seen.get(f"{sv.stage}/loss") != key:
                out.append(read_metrics(run.folder) if run else metrics_frame([]))
            else:
                out.append(gr.skip())
            samples = list(run.samples) if run else []
            out.append(samples if seen.get(f"{sv.stage}/samples") != samples else gr.skip())
            seen.update({f"{sv.stage}/loss": key, f"{sv.stage}/samples": samples})
        return [*out, seen]

    @guarded
    def on_start(preset_: Any, start_from_: Any) -> None:
        manager.start_chain(as_text(preset_, "preset"), as_text(start_from_, "α"))  # atomic: one trainer
        gr.Info(f"chain started in {lab_dir}")

    def starter(stage: str) -> Any:
        @guarded
        def on_start_stage(preset_: Any, start_from_: Any) -> None:
            """The chain up to this stage: earlier stages run first unless done, later ones wait."""
            preset_, start_from_ = as_text(preset_, "preset"), as_text(start_from_, "α")
            name = plan_name(preset_, start_from_, stage)
            manager.start_chain(preset_, start_from_, until=name)
            gr.Info(f"{name} started in {lab_dir} (earlier stages first, unless they are done)")

        return on_start_stage

    @guarded
    def on_stop() -> None:
        if chain_status(lab_dir)["state"] != "running":
            raise ValueError("the chain is not running")
        stop_chain(lab_dir)
        gr.Info("asked the chain to checkpoint and stop")

    @guarded
    def on_resume() -> None:
        status = chain_status(lab_dir)
        if status["state"] == "none":
            raise ValueError(f"no chain in {lab_dir} to resume: press Start chain")
        if status["stages"] and all(s.get("state") == "done" for s in status["stages"]):
            raise ValueError("the chain is done: every stage is exported (Start chain with another preset or α)")
        manager.start_chain(status["preset"], status["start_from"])  # skips what is done

    views = [header, figure, *[c for box in boxes for c in box], shown]
    light = dict(concurrency_limit=None, api_visibility="private", show_progress="hidden")
    start.click(on_start, [preset, start_from], None, preprocess=False, **light)  # inputs checked by name
    for stage, button in stage_buttons.items():
        button.click(starter(stage), [preset, start_from], None, preprocess=False, **light)
    stop.click(on_stop, None, None, **light)
    resume.click(on_resume, None, None, **light)
    gr.Timer(POLL_SECONDS).tick(refresh, shown, views, **light)
    root = gr.context.Context.root_block
    if root is not None:
        root.load(refresh, shown, views, **light)
