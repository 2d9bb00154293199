import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A random PixArt-Σ pipeline folder in diffusers layout (made once per test session)."""
    from fixtures import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny_pipeline"))


@pytest.fixture(scope="session")
def tiny_kv_pipeline(tmp_path_factory):
    """The same with KV compression (R=2 on layer 1), stored in the pixsigma layout."""
    from fixtures import make_tiny_pipeline

    from pixsigma.config import KVCompress

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny_kv_pipeline"), kv=KVCompress(2, (1,)), layout="pixsigma")


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    """``tiny_pipeline`` loaded on the CPU, once per test module (a module may switch its KV setting)."""
    from pixsigma.pipeline import PixSigmaPipeline

    return PixSigmaPipeline.from_pretrained(str(tiny_pipeline), device="cpu")


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, through playwright (the browser tests; ``fixtures.NEEDS_CHROMIUM`` skips them
    where it is missing)."""
    from fixtures import BROWSER_ARGS, CHROMIUM
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=BROWSER_ARGS)
        yield b
        b.close()
