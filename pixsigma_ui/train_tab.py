"""The Train tab: start, stop and resume a training run in its own process, and watch it.

The UI and the trainer (``python -m train CONFIG``) share only files in the run folder (``train.runfiles``):
the trainer writes ``status.json``, ``metrics.jsonl`` and ``log.txt``; the UI writes ``launch.json`` (how it
started the run, so Resume repeats it with ``--resume``) and ``STOP`` (asks the trainer to checkpoint and
stop). The trainer runs detached, so the page never blocks, and a reload (or an app restart) finds every run
under the runs folder again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from pixsigma.io import atomic_write_json
from pixsigma.layout import CHECKOUT, DATA_ROOT, child_env, companion
from pixsigma_ui.inputs import as_bool, as_float, as_int, as_text, guarded
from pixsigma_ui.lab_state import (  # noqa: F401 - read_metrics, metrics_frame: the tab's readers, imported from here
    LAB_FOLDER,
    config_stage,
    log_tail,
    metrics_frame,
    pid_alive,
    read_json,
    read_metrics,
    read_run,
)
from pixsigma_ui.lab_tab import build_lab
from pixsigma_ui.uploads import Uploads, client_of

if CHECKOUT is not None:  # a clone imports train/ by its name; a wheel has it as pixsigma.train (pixsigma.layout)
    from train.runfiles import LAUNCH, LIVE_STATES, STATUS, STDOUT, STOP
    from train.stages import CONTINUING_STAGES as STAGES  # the app starts from a model, never from random weights
else:
    from pixsigma.train.runfiles import LAUNCH, LIVE_STATES, STATUS, STDOUT, STOP
    from pixsigma.train.stages import CONTINUING_STAGES as STAGES

POLL_SECONDS = 2.0
EXIT_WAIT_S = 20.0  # Resume right after Stop waits this long for the stopped trainer's process to exit
SAMPLINGS = 5  # validation images drawn this many times per run, so a short run shows them as it goes
WORLD_IMAGES = 128  # the Start form's default: shapes-world images made (once) and encoded for a short run
MAX_STEPS, MAX_BATCH, MAX_IMAGES = 100_000, 256, 100_000
MAX_LORA_RANK = 256
REPO = DATA_ROOT  # configs/ and assets/: the clone, or a wheel's copy of them


@dataclass(frozen=True)
class Recipe:
    """A config file to launch, plus the ``--set`` overrides that make it this recipe."""

    config: Path
    overrides: tuple[str, ...] = ()
    label: str = ""

    @property
    def title(self) -> str:
        return self.label or self.config.name


def find_recipes(folders: list[Path], finetune_from: str | None = None,
                 model_name: str | None = None) -> dict[str, list[Recipe]]:
    """stage -> the configs in ``folders`` that run it, shapes-world (CPU-sized) ones first. Files named
    ``_*`` are shared bases, not runs; with no finetune config, ``finetune_from`` (the app's model folder)
    is fine-tuned on the shapes base's data."""
    out: dict[str, list[Recipe]] = {s: [] for s in STAGES}
    bases = []
    for folder in folders:
        for path in sorted(folder.glob("*.y*ml")) if folder.is_dir() else []:
            if path.name.startswith("_"):
                bases.append(path)
            elif (stage := config_stage(path)) in out:
                out[stage].append(Recipe(path))
    shapes_base = next((b for b in bases if "shapes" in b.stem), None)
    if not out["finetune"] and finetune_from and shapes_base:
        out["finetune"].append(Recipe(shapes_base, ("stage.name=finetune", f"stage.load_from={finetune_from}"),
                                      f"fine-tune {model_name or Path(finetune_from).name} on the shapes world"))
    return {s: sorted(v, key=lambda r: ("shapes" not in r.config.stem, r.config.name)) for s, v in out.items() if v}


@dataclass
class RunManager:
    """Run folders under ``runs_dir`` and the trainer processes this app started. A run launches as
    ``python -m train.prepare``: its inputs are made first (data, features, starting weights), then it trains;
    ``precheck`` resolves them at Start (``train.prepare.check_stage``) so what cannot be made is refused there."""

    runs_dir: Path
    recipes: dict[str, list[Recipe]]
    module: str = companion("train.prepare")
    python: str = sys.executable
    precheck: bool = True
    uploads: Uploads | None = None  # the Data box's roots and the uploads' budgets (None: the defaults)
    _children: dict[str, subprocess.Popen] = field(default_factory=dict)

    def runs(self) -> list[str]:
        """Run names, newest first."""
        if not self.runs_dir.is_dir():
            return []
        found = [p for p in self.runs_dir.iterdir() if (p / LAUNCH).is_file() or (p / STATUS).is_file()]
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def folder(self, name: str) -> Path:
        path = (self.runs_dir / str(name)).resolve()
        if path.parent != self.runs_dir.resolve() or not path.is_dir():
            raise ValueError(f"no run {name!r} under {self.runs_dir}; runs: {', '.join(self.runs()) or 'none'}")
        return path

    def state(self, name: str) -> dict[str, Any]:
        """status.json, with ``state`` corrected by what the process table says."""
        folder = self.folder(name)
        status = read_json(folder / STATUS)
        child = self._children.get(folder.name)
        if child is not None and child.poll() is not None:  # reap it; a dead child must not stay a zombie
            self._children.pop(folder.name, None)
        alive = ((child is not None and child.poll() is None) or pid_alive(status.get("pid"))
                 or pid_alive(read_json(folder / LAUNCH).get("pid")))  # preparing: no status.json yet
        state = status.get("state") or ("starting" if alive else "not started")
        if state in LIVE_STATES and not alive:
            exit_code = child.returncode if child is not None else None
            state = "died" + (f" (exit {exit_code})" if exit_code is not None else "")
        return {**status, "state": state, "alive": alive, "stopping": (folder / STOP).exists() and alive}

    def live_run(self) -> str | None:
        return next((n for n in self.runs() if self.state(n)["alive"]), None)

    def recipe(self, stage: str, title: str | None = None) -> Recipe:
        """The recipe of ``stage`` called ``title`` (None: the stage's first)."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        found = self.recipes.get(stage, [])
        if not found:
            have = ", ".join(f"{k}: {', '.join(r.title for r in v)}" for k, v in self.recipes.items())
            raise ValueError(f"no config for stage {stage!r}; configs found: {have or 'none'}")
        for r in found:
            if title in (None, "", r.title):
                return r
        raise ValueError(f"no config {title!r} for stage {stage}; accepted: {', '.join(r.title for r in found)}")

    @property
    def lab_dir(self) -> Path:
        """The chain's folder (``train.chain``'s runs folder)."""
        return self.runs_dir / LAB_FOLDER

    def start(self, stage: str, config: str | None = None, data: str = "", steps: int = 100, lr: float = 1e-4,
              batch: int = 4, lora_rank: int = 0, images: int = WORLD_IMAGES) -> str:
        """``lora_rank`` > 0: train a LoRA of that rank on the loaded model (train/lora.py), not its weights.
        ``images``: shapes-world images the run reads when ``data`` is empty (made once, shared by runs)."""
        recipe = self.recipe(stage, config)
        lora = lora_overrides(stage, lora_rank)
        if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
        if not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch size must be an integer from 1 to {MAX_BATCH}, got {batch!r}")
        if not isinstance(lr, int | float) or not 0 < lr <= 1:
            raise ValueError(f"learning rate must be a number in (0, 1], e.g. 1e-4, got {lr!r}")
        if isinstance(images, bool) or not isinstance(images, int) or not 1 <= images <= MAX_IMAGES:
            raise ValueError(f"images must be an integer from 1 to {MAX_IMAGES}, got {images!r}")
        data = (self.uploads or Uploads(self.runs_dir)).confine(data)  # only the runs folder and --data-root
        self.refuse_second_run()
        name = self._free_name(f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}")
        folder = self.runs_dir / name
        overrides = [*recipe.overrides, f"name={name}", f"output_dir={folder}", f"steps={steps}",
                     f"optim.lr={lr:g}", f"batch_size={batch}", f"sample_every={max(1, steps // SAMPLINGS)}", *lora]
        if data:  # the user's images (folder, .jsonl or .zip): not the config's feature cache of the shapes world
            overrides += [f"data.source={Path(data).expanduser().resolve()}", "data.cache="]
        else:
            overrides.append(f"data.max_images={images}")
        if self.precheck:  # what cannot be made is refused now, before a folder or a process exists
            if CHECKOUT is not None:
                from train.prepare import check_stage
            else:
                from pixsigma.train.prepare import check_stage

            check_stage(recipe.config, self.runs_dir, overrides)
        folder = self._new_folder(name)
        cmd = [self.python, "-m", self.module, str(recipe.config), "--runs-dir", str(self.runs_dir)]
        for o in overrides:
            cmd += ["--set", o]
        atomic_write_json({"cmd": cmd, "stage": stage, "steps": steps, "created": time.time()}, folder / LAUNCH,
                          indent=2)
        self._spawn(folder.name, cmd)
        return folder.name

    def stop(self, name: str) -> None:
        folder = self.folder(name)
        if not self.state(name)["alive"]:
            raise ValueError(f"run {name} is not running")
        (folder / STOP).touch()

    def resume(self, name: str) -> None:
        folder = self.folder(name)
        launch = read_json(folder / LAUNCH)
        if not launch.get("cmd"):
            raise ValueError(f"run {name} was not started from this app ({LAUNCH} missing): resume it with "
                             "`python -m train CONFIG --resume` from a shell")
        deadline = time.monotonic() + EXIT_WAIT_S
        while (s := self.state(name))["alive"] and s["state"] not in LIVE_STATES and time.monotonic() < deadline:
            time.sleep(0.2)  # stopped and checkpointed, the process still exiting: a moment, not a refusal
        if s["alive"]:
            raise ValueError(f"run {name} is still running")
        self.refuse_second_run()
        (folder / STOP).unlink(missing_ok=True)
        cmd = [*launch["cmd"], "--resume"] if "--resume" not in launch["cmd"] else launch["cmd"]
        self._spawn(name, cmd)

    def _free_name(self, base: str) -> str:
        for i in range(1, 100):
            name = base if i == 1 else f"{base}-{i}"
            if not (self.runs_dir / name).exists():
                return name
        raise ValueError(f"too many runs named {base}-* in {self.runs_dir}")

    def _new_folder(self, base: str) -> Path:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        for i in range(1, 100):
            folder = self.runs_dir / (base if i == 1 else f"{base}-{i}")
            try:
                folder.mkdir()
                return folder
            except FileExistsError:
                continue
        raise ValueError(f"too many runs named {base}-* in {self.runs_dir}")

    def refuse_second_run(self) -> None:
        """One trainer at a time (a run or the chain): it shares the device with the app's own generation."""
        if CHECKOUT is not None:
            from train.chain import chain_status
        else:
            from pixsigma.train.chain import chain_status

        live = self.live_run()
        if live:
            raise ValueError(f"run {live} is still going: stop it first (one training run at a time)")
        if chain_status(self.lab_dir)["state"] == "running":
            raise ValueError("the chain is still going: stop it first (one training run at a time)")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        folder = self.runs_dir / name
        with open(folder / STDOUT, "ab") as out:
            # Own session: closing the app's terminal or a Ctrl-C in it does not kill the run.
            self._children[name] = subprocess.Popen(cmd, cwd=CHECKOUT or self.runs_dir, env=child_env(dict(os.environ)),
                                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                                    start_new_session=True)
        launch = read_json(folder / LAUNCH)  # the pid: a reloaded or restarted app sees it alive before status.json
        if launch:
            atomic_write_json({**launch, "pid": self._children[name].pid, "started": time.time()}, folder / LAUNCH,
                              indent=2)


def lora_overrides(stage: str, rank: int) -> list[str]:
    """The ``--set`` pairs that make a run train a LoRA of ``rank`` (0: none)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= MAX_LORA_RANK:
        raise ValueError(f"LoRA rank must be an integer from 1 to {MAX_LORA_RANK} (0: no LoRA), got {rank!r}")
    if rank and stage == "from_scratch":
        raise ValueError("a LoRA adapts loaded weights: pick a stage other than from_scratch")
    return [f"lora.rank={rank}", "optim.ema_decay=null"] if rank else []


def status_line(name: str | None, s: dict[str, Any]) -> str:
    if not name:
        return "No runs yet: pick a stage and press Start stage (the defaults work as they are)."
    loss = s.get("last_loss")
    parts = [f"**{name}**", f"state: **{s.get('state')}**" + (" (stop requested)" if s.get("stopping") else ""),
             f"step {s.get('step', 0)}/{s.get('total_steps', '?')}"]
    if isinstance(loss, int | float):
        parts.append(f"loss {loss:.4f}")
    if s.get("error"):
        parts.append(f"error: {s['error']}")
    return " · ".join(parts)


def samples_of(folder: Path, s: dict[str, Any]) -> list[str]:
    out = []
    for p in s.get("samples") or []:
        path = Path(p) if Path(p).is_absolute() else folder / p
        if path.is_file():
            out.append(str(path))
    return out


def build_train_tab(demo: gr.Blocks, manager: RunManager) -> None:
    """The tab's components and events; ``demo`` is the enclosing Blocks (a page load re-finds the runs)."""
    stage_choices = [s for s in STAGES if s in manager.recipes] or list(STAGES)
    first = "finetune" if "finetune" in stage_choices else stage_choices[-1]  # the least setup

    def recipe_titles(stage_: str) -> list[str]:
        return [r.title for r in manager.recipes.get(stage_, [])]

    build_lab(manager)
    gr.Markdown("## One stage\nInputs are made on demand when it starts (shapes-world images, features, starting "
                "weights: the previous stage's run in the lab, else the shipped model); Stop checkpoints, Resume "
                "continues from there.")
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Row():
                stage = gr.Dropdown(stage_choices, value=first, label="Stage", elem_id="train-stage")
                config = gr.Dropdown(recipe_titles(first), value=next(iter(recipe_titles(first)), None),
                                     label="Config", elem_id="train-config")
            with gr.Row():
                data = gr.Textbox(value="", label="Data (empty: the shapes world)",
                                  placeholder="folder of images + .txt captions, .jsonl or .zip", scale=3)
                upload = gr.File(label="or upload a .zip", file_types=[".zip"], type="filepath", height=80,
                                 elem_id="train-upload", scale=2)
                images = gr.Number(value=WORLD_IMAGES, precision=0, minimum=1, maximum=MAX_IMAGES,
                                   label="World images", elem_id="train-images")
            with gr.Row():
                steps = gr.Number(value=50, precision=0, minimum=1, maximum=MAX_STEPS, label="Steps",
                                  elem_id="train-steps")
                lr = gr.Number(value=1e-4, label="Learning rate")
                batch = gr.Number(value=4, precision=0, minimum=1, maximum=MAX_BATCH, label="Batch")
            with gr.Row():  # LoRA: final/ is then an adapter for --lora and the Generate tab's picker
                lora = gr.Checkbox(value=False, label="Train a LoRA (not the weights)", elem_id="train-lora")
                rank = gr.Number(value=16, precision=0, minimum=1, maximum=MAX_LORA_RANK, label="LoRA rank")
            with gr.Row():
                start = gr.Button("Start stage", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
                resume = gr.Button("Resume", elem_id="train-resume")
            run = gr.Dropdown(manager.runs(), value=None, label="Run", allow_custom_value=False, elem_id="run")
            status = gr.Markdown(elem_id="train-status")
        with gr.Column(scale=2):
            plot = gr.LinePlot(x="step", y="loss", title="training loss", height=260, elem_id="loss-plot")
            samples = gr.Gallery(label="Latest validation images", columns=4, height=220, object_fit="contain")
    log = gr.Textbox(label="Log (tail)", lines=12, max_lines=12, autoscroll=True, elem_id="train-log")

    def refresh(name: str | None):
        if not name:
            return status_line(None, {}), metrics_frame([]), [], ""
        try:
            folder, s = manager.folder(name), manager.state(name)
        except ValueError as e:
            return str(e), gr.skip(), gr.skip(), gr.skip()
        view = read_run(manager.runs_dir, folder)
        line = status_line(name, s) if view.state != "preparing" else f"**{name}** · state: **preparing** · " \
            f"{view.progress}"
        return line, read_metrics(folder), samples_of(folder, s), log_tail(folder)

    @guarded
    def on_start(stage_, config_, data_, steps_, lr_, batch_, lora_=False, rank_=16, images_=WORLD_IMAGES):
        name = manager.start(as_text(stage_, "stage"), as_text(config_, "config") or None,
                             as_text(data_, "data").strip(), as_int(steps_, "steps"), as_float(lr_, "learning rate"),
                             as_int(batch_, "batch size"), as_int(rank_, "LoRA rank") if as_bool(lora_, "lora") else 0,
                             as_int(images_, "world images"))
        return gr.Dropdown(choices=manager.runs(), value=name)

    uploads = manager.uploads or Uploads(manager.runs_dir)

    @guarded
    def on_upload(path_, request: gr.Request):
        """Unpacked once into RUNS/uploads within the budgets (pixsigma_ui.uploads), checked; gradio's copy removed."""
        if not path_:
            return gr.skip()
        found = uploads.receive(path_, client_of(request))
        gr.Info(f"{Path(path_).name}: {found.summary()}")
        return str(found.source)

    @guarded
    def on_stop(name):
        manager.stop(name)
        gr.Info(f"asked {name} to checkpoint and stop")

    @guarded
    def on_resume(name):
        manager.resume(name)

    def on_load(current):
        names = manager.runs()
        return gr.Dropdown(choices=names, value=current if current in names else (names[0] if names else None))

    views = [status, plot, samples, log]
    light = dict(concurrency_limit=None, api_visibility="private", show_progress="hidden")
    stage.change(lambda s_: gr.Dropdown(choices=recipe_titles(s_), value=next(iter(recipe_titles(s_)), None)),
                 stage, config, **light)
    start.click(on_start, [stage, config, data, steps, lr, batch, lora, rank, images], run,
                preprocess=False, **light)  # inputs checked by name
    upload.upload(on_upload, upload, data, **light)
    stop.click(on_stop, run, None, **light)
    resume.click(on_resume, run, None, **light)
    run.change(refresh, run, views, **light)
    gr.Timer(POLL_SECONDS).tick(refresh, run, views, **light)
    demo.load(on_load, run, run, **light)

