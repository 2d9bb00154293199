"""The Generate tab's LoRA picker, and the ``loras`` API parameter's check.

The app offers only LoRAs it knows: the shipped ones (``pixsigma.registry.LORA_ALIASES``) and those found in
the LoRA folder (``PIXSIGMA_LORA_DIR``, default ``./loras``: ``.safetensors`` files and PEFT folders), by name.
A request names them with scales, ``"demo-tiny-huge:1.0, my_style:0.5"`` (or a list of such strings); a name
the app does not offer is refused, so an API caller cannot make the server read arbitrary files. The engine
swaps adapters per request without reloading the model (``pixsigma.lora``).
"""

from __future__ import annotations

import os
import reprlib
from pathlib import Path

import gradio as gr

from pixsigma.lora import LORA_FILES, SCALE_RANGE, LoraSpec, parse_loras
from pixsigma.registry import LORA_ALIASES

LORA_DIR_ENV = "PIXSIGMA_LORA_DIR"
MAX_LORAS = 4  # adapters one request may stack


def lora_dir() -> Path:
    return Path(os.environ.get(LORA_DIR_ENV, "loras"))


def available_loras(folder: Path | None = None) -> dict[str, str]:
    """Name -> what ``pixsigma.lora`` reads (an alias, a file or a folder): shipped ones first, then found ones."""
    out = {name: name for name, path in LORA_ALIASES.items() if path.is_dir()}
    folder = lora_dir() if folder is None else folder
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.suffix == ".safetensors" and p.is_file():
                out.setdefault(p.stem, str(p))
            elif p.is_dir() and any((p / n).is_file() for n in LORA_FILES):
                out.setdefault(p.name, str(p))
    return out


def resolve_loras(value: str | list | None, offered: dict[str, str] | None = None) -> tuple[LoraSpec, ...]:
    """The API's ``loras`` as specs the pipeline reads; a name not offered, a bad scale (``LoraSpec`` checks it
    against ``SCALE_RANGE``) or too many: ValueError."""
    offered = available_loras() if offered is None else offered
    try:
        specs = parse_loras(value or None)
    except ValueError as e:
        raise ValueError(f"loras: {e}") from None
    if len(specs) > MAX_LORAS:
        raise ValueError(f"loras: at most {MAX_LORAS} LoRAs per request, got {len(specs)}")
    out = []
    for s in specs:
        if s.path not in offered:
            raise ValueError(f"loras: unknown LoRA {reprlib.repr(s.path)}; accepted: "
                             f"{', '.join(offered) or 'none offered'} (as 'name:scale, …'; files go in "
                             f"{LORA_DIR_ENV} = {lora_dir()})")
        out.append(LoraSpec(offered[s.path], s.scale))
    return tuple(out)


def with_names(names: list[str] | None, text: str) -> str:
    """The ``loras`` text for the picked ``names``, keeping scales already typed for them (new ones: 1.0)."""
    try:
        scales = {s.path: s.scale for s in parse_loras(text or None)}
    except ValueError:  # a half-typed text: start the scales afresh
        scales = {}
    return ", ".join(f"{n}:{scales.get(n, 1.0):g}" for n in names or [])


def build_lora_picker() -> gr.Textbox:
    """The picker (a multiselect of offered names) and the ``loras`` text it fills; returns the text box, which is
    the generate event's input."""
    offered = available_loras()
    with gr.Accordion("LoRA adapters", open=False):
        picked = gr.Dropdown(list(offered), value=[], multiselect=True, label="LoRAs",
                             info=f"shipped ones and those in {lora_dir()}", elem_id="lora-pick")
        text = gr.Textbox(value="", label="LoRAs with scales (name:scale, …)", elem_id="loras",
                          info=f"adapters add up; scale in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}], 0 = off")
    picked.change(lambda n, t: with_names(n, t), [picked, text], text, queue=False, api_visibility="private")
    return text
