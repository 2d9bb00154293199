"""The README's pictures: a grid of demo images under their prompts and a PixArt-α vs PixArt-Σ pair.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/readme_images.py [--out assets/readme]

Both come from the shipped demo pair, each sampled with its folder's own settings (what `generate` and the app
do), at fixed seeds, so a rerun on the same versions redraws the same pixels. PNGs are written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pixsigma.io import atomic_write
from pixsigma.pipeline import GenerationRequest, PixSigmaPipeline

ROOT = Path(__file__).resolve().parents[1]
# Short prompts (the demo Σ's prompt expander rewrites them) and long dense ones (read as typed).
GRID = (
    "a red circle above a blue square",
    "a green triangle left of a purple ring",
    "a blue triangle and an orange ring",
    "three red squares",
    "Three shapes on a plain white background. A large red circle in the top left. A medium green star in the "
    "centre. A small blue square in the bottom right.",
    "Two shapes on a grey and cream background split top to bottom. A large purple triangle in the middle left. "
    "A medium yellow ring in the middle right.",
)
PAIR = "a green triangle left of a purple ring"
SEED = 0  # one seed for every image: the prompts were chosen, the samples were not
TILE = 256  # px: the demo Σ's base resolution; α's 128 px images are enlarged to it (nearest, pixels kept)
COLUMNS = 3
PAD = 8
FONT_SIZE = 13


def sample(pipe: PixSigmaPipeline, prompt: str, seed: int) -> Image.Image:
    """One image with the folder's own sampling settings, enlarged to a tile."""
    image = pipe.generate(GenerationRequest(prompt, seed=seed)).images[0]
    return image.resize((TILE, TILE), Image.NEAREST) if image.size != (TILE, TILE) else image


def caption_font() -> ImageFont.FreeTypeFont:
    """DejaVu Sans as matplotlib ships it: it has α and Σ (Pillow's default font does not), on every machine."""
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans")), FONT_SIZE)


def wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to lines at most ``width`` pixels wide."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def captioned(tiles: list[tuple[Image.Image, str]], columns: int) -> Image.Image:
    """Tiles on a white sheet, each with its wrapped caption underneath."""
    font = caption_font()
    wrapped = [wrap(text, font, TILE) for _, text in tiles]
    caption_h = max(len(lines) for lines in wrapped) * (FONT_SIZE + 3) + PAD
    rows = -(-len(tiles) // columns)
    cell_w, cell_h = TILE + PAD, TILE + caption_h + PAD
    sheet = Image.new("RGB", (columns * cell_w + PAD, rows * cell_h + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for i, ((image, _), lines) in enumerate(zip(tiles, wrapped)):
        x, y = PAD + (i % columns) * cell_w, PAD + (i // columns) * cell_h
        sheet.paste(image, (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + TILE + 4 + j * (FONT_SIZE + 3)), line, fill=(40, 40, 40), font=font)
    return sheet


def save(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", optimize=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "readme", help="folder for the PNGs")
    out = parser.parse_args(argv).out
    sigma = PixSigmaPipeline.from_pretrained("demo", device="cpu")
    grid = [(sample(sigma, prompt, SEED), f"“{prompt}”") for prompt in GRID]
    save(captioned(grid, COLUMNS), out / "demo_grid.png")
    alpha = PixSigmaPipeline.from_pretrained("demo-alpha", device="cpu")
    pair = [(sample(alpha, PAIR, SEED), "PixArt-α, 128 px (shown enlarged)"),
            (sample(sigma, PAIR, SEED), "PixArt-Σ, 256 px, KV R = 2")]
    sheet = captioned(pair, 2)
    titled = Image.new("RGB", (sheet.width, sheet.height + FONT_SIZE + PAD), "white")
    titled.paste(sheet, (0, FONT_SIZE + PAD))
    ImageDraw.Draw(titled).text((PAD, PAD // 2), f"“{PAIR}”, seed {SEED}", fill=(40, 40, 40),
                                font=caption_font())
    save(titled, out / "alpha_vs_sigma.png")
    for name in ("demo_grid.png", "alpha_vs_sigma.png"):
        print(out / name)


if __name__ == "__main__":
    main()
