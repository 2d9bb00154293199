"""Style presets and example prompts, one set for real (XL) models and one for the shapes demo.

The demo models only know the words of the shapes world (shapes, palette colours, sizes,
places, backgrounds), so their "styles" are backgrounds; a photographic style would only
produce unknown-word warnings there.
"""

from __future__ import annotations

from dataclasses import dataclass

NO_STYLE = "(none)"


@dataclass(frozen=True)
class Style:
    """``template`` holds ``{prompt}``; ``negative`` is appended to the user's negative prompt."""

    name: str
    template: str = "{prompt}"
    negative: str = ""

    def __post_init__(self) -> None:
        if "{prompt}" not in self.template:
            raise ValueError(f"style {self.name!r}: template must contain '{{prompt}}', got {self.template!r}")

    def apply(self, prompt: str, negative_prompt: str = "") -> tuple[str, str]:
        """(styled prompt, negative prompt joined with the style's)."""
        styled = self.template.replace("{prompt}", prompt.strip())
        negatives = [n for n in (negative_prompt.strip(), self.negative) if n]
        return styled, ", ".join(negatives)


_XL_STYLES = (
    Style(NO_STYLE),
    Style("Photographic", "cinematic photo of {prompt}, 35mm photograph, film, bokeh, professional, highly detailed",
          "drawing, painting, crayon, sketch, graphite, impressionist, noisy, blurry, soft, deformed, ugly"),
    Style("Cinematic", "cinematic still of {prompt}, emotional, harmonious, vignette, highly detailed, high budget, "
          "moody, epic, gorgeous, film grain, grainy", "anime, cartoon, graphic, text, painting, crayon, abstract"),
    Style("Anime", "anime artwork of {prompt}, anime style, key visual, vibrant, studio anime, highly detailed",
          "photo, deformed, black and white, realism, disfigured, low contrast"),
    Style("Digital art", "concept art of {prompt}, digital artwork, illustrative, painterly, matte painting, "
          "highly detailed", "photo, photorealistic, realism, ugly"),
    Style("Watercolor", "watercolor painting of {prompt}, vibrant, beautiful, painterly, detailed, textural, artistic",
          "anime, photorealistic, 35mm film, deformed, glitch, low contrast, noisy"),
    Style("3D model", "professional 3d model of {prompt}, octane render, highly detailed, volumetric, "
          "dramatic lighting",
          "ugly, deformed, noisy, low poly, blurry, painting"),
    Style("Pixel art", "pixel-art {prompt}, low-res, blocky, pixel art style, 8-bit graphics",
          "sloppy, messy, blurry, noisy, highly detailed, ultra textured, photo, realistic"),
)

# Backgrounds of the shapes world (shapes.world.BACKGROUNDS): the one "style" its captions describe.
_DEMO_STYLES = (
    Style(NO_STYLE),
    Style("White background", "{prompt} on a plain white background"),
    Style("Mint background", "{prompt} on a plain mint background"),
    Style("Lilac background", "{prompt} on a plain lilac background"),
    Style("Cream background", "{prompt} on a plain cream background"),
    Style("Split grey / white", "{prompt} on a grey and white background split left to right"),
)

_XL_EXAMPLES = (
    "A small cactus with a happy face in the Sahara desert.",
    "An astronaut riding a horse on the moon, oil painting by Van Gogh.",
    "A close-up photo of a red fox in a snowy forest at golden hour, shallow depth of field.",
    "A cozy wooden cabin by a lake at dawn, mist over the water, mountains behind, ultra detailed.",
    "Isometric illustration of a tiny floating island with a lighthouse, pastel colors.",
)

_DEMO_EXAMPLES = (
    "a red circle above a blue square",
    "a large yellow star in the centre",
    "a green triangle left of a purple ring",
    "Two shapes on a plain mint background. A large orange cross in the top left. A small black circle in the "
    "bottom right.",
    "Three shapes on a cream and lilac background split left to right. A medium pink star in the top middle. "
    "A small blue ring in the centre. A large brown square in the bottom left.",
)


def styles_for(is_xl: bool) -> tuple[Style, ...]:
    return _XL_STYLES if is_xl else _DEMO_STYLES


def style_by_name(name: str | None, is_xl: bool) -> Style:
    """The preset called ``name`` (None or '' = no style); a ValueError lists the accepted names."""
    styles = styles_for(is_xl)
    if not name:
        return styles[0]
    for s in styles:
        if s.name == name:
            return s
    raise ValueError(f"unknown style {name!r}; accepted: {', '.join(s.name for s in styles)}")


def examples_for(is_xl: bool) -> tuple[str, ...]:
    return _XL_EXAMPLES if is_xl else _DEMO_EXAMPLES
