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
from collections.abc import Sequence
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
    from train.chain import CHAIN_RUN, launch_chain
    from train.runfiles import LAUNCH, LIVE_STATES, STATUS, STDOUT, STOP
    from train.runlock import FolderBusy, Lease, acquire, spawn
    from train.stages import CONTINUING_STAGES as STAGES  # the app starts from a model, never from random weights
else:
    from pixsigma.train.chain import CHAIN_RUN, launch_chain
    from pixsigma.train.runfiles import LAUNCH, LIVE_STATES, STATUS, STDOUT, STOP
    from pixsigma.train.runlock import FolderBusy, Lease, acquire, spawn
    from pixsigma.train.stages import CONTINUING_STAGES as STAGES

POLL_SECONDS = 2.0
EXIT_WAIT_S = 60.0  # a request right after Stop (or a run's end) waits this long for the trainer to exit
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
    exit_wait_s: float = EXIT_WAIT_S  # Start, Resume, Start chain wait this long for a stopping trainer to exit
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
        base = f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"

        def overrides_for(name: str) -> list[str]:
            sets = [*recipe.overrides, f"name={name}", f"output_dir={self.runs_dir / name}", f"steps={steps}",
                    f"optim.lr={lr:g}", f"batch_size={batch}", f"sample_every={max(1, steps // SAMPLINGS)}", *lora]
            if data:  # the user's images (folder, .jsonl or .zip): not the config's feature cache of the shapes world
                return [*sets, f"data.source={Path(data).expanduser().resolve()}", "data.cache="]
            return [*sets, f"data.max_images={images}"]

        self.refuse_second_run()
        if self.precheck:  # what cannot be made is refused now, before a folder or a process exists
            if CHECKOUT is not None:
                from train.prepare import check_stage
            else:
                from pixsigma.train.prepare import check_stage

            check_stage(recipe.config, self.runs_dir, overrides_for(self._free_name(base)))
        # from here to the trainer's start no other Start, Resume or chain runs
        with self._slot("", doing=f"starting {base}") as slot:
            self.refuse_second_run()  # a trainer started from a shell, seen through its files
            folder = self._new_folder(base)  # mkdir: the name is this call's even against another app
            cmd = [self.python, "-m", self.module, str(recipe.config), "--runs-dir", str(self.runs_dir)]
            for o in overrides_for(folder.name):
                cmd += ["--set", o]
            with acquire(folder, doing="training") as lease:
                atomic_write_json({"cmd": cmd, "stage": stage, "steps": steps, "created": time.time()},
                                  folder / LAUNCH, indent=2)
                slot.note(run=folder.name, doing="training")
                self._spawn(folder.name, cmd, [slot, lease])
        return folder.name

    def stop(self, name: str) -> None:
        folder = self.folder(name)
        if not self.state(name)["alive"]:
            raise ValueError(f"run {name} is not running")
        (folder / STOP).touch()

    def resume(self, name: str) -> None:
        """Continue the run from its checkpoint. Right after Stop the trainer still finishes its step: Resume waits
        up to ``exit_wait_s`` for it to exit (to let go of the run), then says how long it has been stopping."""
        folder = self.folder(name)
        launch = read_json(folder / LAUNCH)
        if not launch.get("cmd"):
            raise ValueError(f"run {name} was not started from this app ({LAUNCH} missing): resume it with "
                             "`python -m train CONFIG --resume` from a shell")
        s = self.state(name)
        stopping = s["alive"] and (s["stopping"] or s["state"] not in LIVE_STATES)  # asked to stop, or exiting
        if s["alive"] and not stopping:
            raise ValueError(f"run {name} is still running")
        deadline = time.monotonic() + self.exit_wait_s
        with self._slot(name, deadline) as slot, self._take(folder, name, deadline) as lease:
            self.refuse_second_run()  # a trainer started from a shell, seen through its files
            (folder / STOP).unlink(missing_ok=True)
            cmd = [*launch["cmd"], "--resume"] if "--resume" not in launch["cmd"] else launch["cmd"]
            slot.note(run=name, doing="training")
            self._spawn(name, cmd, [slot, lease])

    def _slot(self, asked: str, deadline: float | None = None, doing: str | None = None) -> Lease:
        """The runs folder's lock: one trainer at a time. Held from a Start's (Resume's, chain's) check to its
        trainer's start, then by the trainer until it exits (``train.runlock.spawn`` hands it over)."""
        return self._take(self.runs_dir, asked, deadline, doing=doing or f"starting {asked}")

    def _take(self, folder: Path, asked: str, deadline: float | None = None, doing: str = "training") -> Lease:
        """``folder``'s lock for ``asked``. Held by a trainer that is only exiting (stop asked, or its files say
        it is done) it is retried until ``deadline`` (default: ``exit_wait_s`` from now), as long as the same
        process holds it; any other holder is refused at once."""
        deadline = time.monotonic() + self.exit_wait_s if deadline is None else deadline
        first: int | None = None
        while True:
            try:
                return acquire(folder, doing=doing)
            except FolderBusy as e:
                info = e.info if folder == self.runs_dir else {"run": folder.name}
                first = e.pid if first is None else first
                if e.pid != first or not self._exiting(info):  # a live trainer, or a new one: refused now
                    raise ValueError(self._busy(e, asked)) from None
                if time.monotonic() >= deadline:
                    raise ValueError(self._still_exiting(info, e)) from None
                time.sleep(0.2)

    def _exiting(self, info: dict[str, Any]) -> bool:
        """Whether the trainer a lock file names has been asked to stop or says it is done (its process still
        winding down: finishing its step, checkpointing, exiting)."""
        run = info.get("run")
        if run == LAB_FOLDER and info.get("chain"):
            return read_json(self.lab_dir / CHAIN_RUN).get("state") != "running" or (self.lab_dir / STOP).exists()
        if not isinstance(run, str) or not run or Path(run).name != run:
            return False
        folder = self.runs_dir / run
        status, launch = read_json(folder / STATUS), read_json(folder / LAUNCH)
        fresh = launch.get("started", 0) > status.get("updated", 0)  # resumed: its old status still there
        return (folder / STOP).exists() or (status.get("state") not in (None, *LIVE_STATES) and not fresh)

    def _busy(self, e: FolderBusy, asked: str) -> str:
        """The refusal for a held lock, in the tab's words (``asked``: the run the caller wants)."""
        run, pid = e.info.get("run"), f"pid {e.pid}" if e.pid is not None else "pid not yet written"
        if e.folder != self.runs_dir.resolve():  # a run folder: its trainer (maybe started from a shell)
            return f"run {e.folder.name} is still running ({pid})"
        if run == LAB_FOLDER and e.info.get("chain"):
            return f"the chain is still going: stop it first (one training run at a time; {pid})"
        if run == asked:
            return f"run {run} is still running ({pid}): it was just started or resumed"
        if isinstance(run, str):
            return f"run {run} is still going: stop it first (one training run at a time; {pid})"
        doing = e.info.get("doing") if isinstance(e.info.get("doing"), str) else "starting a run"
        return f"another request is {doing} ({pid}): one training run at a time, try again in a moment"

    def _still_exiting(self, info: dict[str, Any], e: FolderBusy) -> str:
        """The refusal after ``exit_wait_s`` of waiting for a stopping trainer: how long, and what to do."""
        run = info.get("run")
        folder = self.lab_dir if info.get("chain") else self.runs_dir / str(run)
        try:
            asked = (folder / STOP).stat().st_mtime
        except OSError:
            asked = None
        what = "the chain" if info.get("chain") else f"run {run}"
        since = f"was asked to stop {time.time() - asked:.0f} s ago and " if asked is not None else ""
        return (f"{what} {since}is still finishing its step (its trainer, pid {e.pid}, had not exited after "
                f"{self.exit_wait_s:g} s of waiting): it checkpoints and exits at the end of the step in hand, which "
                "can take minutes on a large model; try again once it reads stopped")

    def start_chain(self, preset: str, start_from: str, until: str | None = None) -> int:
        """Start (or continue) the chain in ``lab_dir``, atomically with the one-trainer check; returns its pid."""
        with self._slot("the chain") as slot:
            self.refuse_second_run()
            slot.note(run=LAB_FOLDER, chain=True, doing="the chain")
            return launch_chain(preset, self.lab_dir, start_from, python=self.python, until=until, held=[slot])

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

        # a trainer only exiting is waited for at the runs folder's lock (``_take``), not refused here
        live = next((n for n in self.runs() if self.state(n)["alive"] and not self._exiting({"run": n})), None)
        if live:
            raise ValueError(f"run {live} is still going: stop it first (one training run at a time)")
        if chain_status(self.lab_dir)["state"] == "running" and not (self.lab_dir / STOP).exists():
            raise ValueError("the chain is still going: stop it first (one training run at a time)")

    def _spawn(self, name: str, cmd: list[str], held: Sequence[Lease] = ()) -> None:
        """Start the trainer detached, holding ``held``'s locks (it inherits them: they are its until it exits)."""
        folder = self.runs_dir / name
        with open(folder / STDOUT, "ab") as out:
            # Own session: closing the app's terminal or a Ctrl-C in it does not kill the run.
            self._children[name] = spawn(cmd, held, cwd=CHECKOUT or self.runs_dir, env=child_env(dict(os.environ)),
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

