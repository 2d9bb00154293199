"""The user docs: the README's shape and set-up commands, the demo's model card, and links that resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MODEL_CARD = ROOT / "assets" / "demo" / "README.md"
SET_UP = ("bash scripts/setup.sh && .venv/bin/python app.py", "bash scripts/test.sh")
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def linked_docs() -> list[Path]:
    return [README, MODEL_CARD, *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(text: str) -> list[str]:
    """Link targets that name a file in the repository (not a URL, not an anchor in the same page)."""
    text = FENCE.sub("", text)  # code blocks hold commands and examples, not links
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t.split("#", 1)[0] for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t, re.I)]


def front_matter(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "the model card must open with a YAML block between --- lines"
    return yaml.safe_load(match.group(1))


def test_readme_is_short_and_opens_with_the_two_set_up_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    first_block = FENCE.search(text)
    assert first_block, "README has no code block"
    assert all(cmd in first_block.group(1) for cmd in SET_UP), first_block.group(1)
    # nothing but the title and a line or two of introduction comes before them
    assert "\n## " not in text[: first_block.start()]


def test_model_card_front_matter_has_the_hub_fields():
    meta = front_matter(MODEL_CARD.read_text())
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-to-image"
    assert isinstance(meta["tags"], list) and {"pixart-sigma", "diffusion-transformer", "tiny"} <= set(meta["tags"])


def test_model_card_holds_the_report_table_verbatim():
    table = (ROOT / "assets" / "demo" / "shapesbench.md").read_text()
    assert table.startswith("| model |") and table in MODEL_CARD.read_text()


@pytest.mark.parametrize("doc", linked_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(doc: Path):
    missing = [t for t in relative_links(doc.read_text()) if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


def test_link_check_sees_links_and_skips_urls_and_anchors():
    text = "[a](docs/app.md#options) ![b](assets/x.png) [c](https://x.org/y) [d](#top)\n```\n[e](nope.md)\n```\n"
    assert relative_links(text) == ["docs/app.md", "assets/x.png"]


@pytest.mark.parametrize("doc", linked_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_the_shapes_package_not_its_old_place(doc: Path):
    assert not re.search(r"pixsigma[./]demo\b", doc.read_text())


def help_options(run, capsys) -> set[str]:
    """The long options a command's ``--help`` lists."""
    with pytest.raises(SystemExit):
        run()
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", capsys.readouterr().out)) - {"--help"}


def test_readme_cli_synopsis_lists_exactly_the_generate_options(capsys):
    from pixsigma.cli import main

    text = README.read_text()
    synopsis = next(b for b in FENCE.findall(text) if b.startswith('pixsigma generate "PROMPT"'))
    generate = synopsis.split("\npixsigma convert")[0]
    documented = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", generate))
    assert documented == help_options(lambda: main(["generate", "--help"]), capsys)


def test_app_doc_option_table_lists_exactly_the_app_options(capsys):
    from pixsigma_ui import server

    text = (ROOT / "docs" / "app.md").read_text()
    table = text.split("## Options and environment", 1)[1].split("\n## ", 1)[0]
    first_cells = [row.split("|")[1] for row in table.splitlines() if row.startswith("| `--")]
    documented = {opt for cell in first_cells for opt in re.findall(r"--[a-z][a-z0-9-]*", cell)}
    assert documented == help_options(lambda: server.parse_args(["--help"]), capsys)
