"""The app in a real browser (Debian's Chromium, headless): Generate, Compare, Train, an error toast.

``python app.py`` runs as a subprocess on tiny random pipelines, with ``--enable-training`` and a
finetune config for the real trainer; screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import shutil
import time

import pytest
from fixtures import ARTIFACTS, NEEDS_CHROMIUM, served_app, stop_pids

pytestmark = NEEDS_CHROMIUM

FINETUNE = """\
stage: {{name: finetune, load_from: {model}}}
data: {{source: {data}, text_encoder: {model}, vae: {model}, num_workers: 0}}
mixed_precision: "no"
batch_size: 2
log_every: 1
save_every: 1000
sample_every: 3
sample_prompts: ["a red circle"]
sample_steps: 2
"""


@pytest.fixture(scope="module")
def app_url(tiny_pipeline, tmp_path_factory):
    from pixsigma.folder_settings import SamplingDefaults
    from shapes.world import make_dataset

    tmp = tmp_path_factory.mktemp("browser_app")
    make_dataset(tmp / "data", 6, sizes=((256, 256),))
    (tmp / "configs").mkdir()
    (tmp / "configs" / "shapes_finetune.yaml").write_text(FINETUNE.format(model=tiny_pipeline, data=tmp / "data"))
    sigma = tmp / "sigma"  # Σ names a prompt expander, as the demo Σ does; α (the same weights) does not
    shutil.copytree(tiny_pipeline, sigma)
    SamplingDefaults(prompt_expander="shapes").write(sigma)
    args = ["--model", str(sigma), "--alpha-model", str(tiny_pipeline), "--device", "cpu", "--enable-training",
            "--runs-dir", str(tmp / "runs"), "--train-configs", str(tmp / "configs"), "--outputs", str(tmp / "outputs")]
    try:
        with served_app(args, tmp) as url:
            yield url
    finally:
        stop_pids((tmp / "runs").glob("*/status.json"))  # leave no trainer behind


@pytest.fixture
def page(browser, app_url):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(app_url)
    page.wait_for_selector("#generate", timeout=30_000)
    yield page
    page.close()


def test_generate_shows_images_time_and_memory(page):
    page.fill("#prompt textarea", "a red circle above a blue square")
    page.fill("input[aria-label='number input for Steps']", "30")
    page.click("#generate")
    # While denoising: a latent preview in the gallery and the step under it.
    page.wait_for_function("document.querySelector('#stats').innerText.includes('denoising… step')",
                           timeout=60_000, polling=50)
    page.wait_for_selector("#gallery img", timeout=60_000)
    page.wait_for_function("document.querySelector('#stats').innerText.includes('peak memory')", timeout=60_000)
    stats = page.inner_text("#stats")
    assert "256×256 px" in stats and "30 steps" in stats and " s · peak memory" in stats
    assert "the model read (prompt expanded): Two shapes on " in stats  # what Σ read, under the image
    assert page.locator("#files").get_by_text(".png").count() >= 1  # the download list
    page.screenshot(path=str(ARTIFACTS / "app-generate.png"), full_page=True)
    page.locator("#expand input[type=checkbox]").uncheck()  # the prompt as typed
    page.fill("input[aria-label='number input for Steps']", "2")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#stats').innerText.includes('2 steps')", timeout=60_000)
    assert "prompt expanded" not in page.inner_text("#stats")


def test_bad_input_shows_an_error_toast(page):
    page.fill("#prompt textarea", "   ")
    page.click("#generate")
    toast = page.get_by_text("the prompt is empty: describe the image to draw")
    toast.first.wait_for(timeout=30_000)
    page.wait_for_timeout(600)  # the toast slides in
    page.screenshot(path=str(ARTIFACTS / "app-error.png"))


def test_compare_shows_alpha_and_sigma_side_by_side(page):
    page.get_by_role("tab", name="Compare").click()
    page.fill("#compare-prompt textarea", "a green star")
    page.click("#compare")
    for panel in ("#alpha-image", "#sigma-image", "#full-image", "#kv-image"):
        page.wait_for_selector(f"{panel} img", timeout=90_000)
    labels = page.inner_text("#alpha-image") + page.inner_text("#kv-image")
    assert "PixArt-α" in labels and " s" in labels and "KV R=2" in labels
    page.screenshot(path=str(ARTIFACTS / "app-compare.png"), full_page=True)


def test_train_starts_a_run_and_the_loss_plot_updates(page):
    page.get_by_role("tab", name="Train").click()
    page.fill("#train-steps input", "200")  # long enough to be seen running between 2 s polls on a quiet CPU
    page.click("#train-start")
    # Live: the status passes through a running step before the end, with the plot drawn.
    running = "/state: running · step ([1-9]|[1-9][0-9]|1[0-9][0-9])\\/200/"
    page.wait_for_function(f"{running}.test(document.querySelector('#train-status').innerText)",
                           timeout=120_000, polling=100)
    page.wait_for_selector("#loss-plot canvas, #loss-plot svg", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "app-train-running.png"), full_page=True)
    page.wait_for_function("document.querySelector('#train-status').innerText.includes('finished')",
                           timeout=120_000)
    status = page.inner_text("#train-status")
    assert "step 200/200" in status and "loss" in status
    page.wait_for_selector("#loss-plot canvas, #loss-plot svg", timeout=30_000)
    time.sleep(POLL_WAIT)  # one more poll so the plot holds every step
    assert "finished at step 200" in page.input_value("#train-log textarea")  # log.txt (or stdout) tail
    page.screenshot(path=str(ARTIFACTS / "app-train.png"), full_page=True)


POLL_WAIT = 2.5
