"""The Train tab's lab in a real browser, from a fresh state: the shipped demo model, an empty runs folder,
nothing generated or extracted. The default selections (fine-tune the loaded model on the shapes world) start,
the run's inputs are made on demand, it trains, stops at a checkpoint and resumes from it.

``python app.py --enable-training`` runs as a subprocess with its defaults (the repository's configs); screenshots
go to ``test-artifacts/``.
"""

from __future__ import annotations

import json
import re

import pytest
from fixtures import ARTIFACTS, NEEDS_CHROMIUM, served_app, stop_pids

IMAGES = "24"  # world images made and encoded for the run: the default's path, kept short

pytestmark = NEEDS_CHROMIUM


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab_app")
    runs = tmp / "runs"
    args = ["--device", "cpu", "--enable-training", "--runs-dir", str(runs), "--outputs", str(tmp / "outputs")]
    try:
        with served_app(args, tmp, env={"OMP_NUM_THREADS": "1"}) as url:
            yield url, runs
    finally:
        stop_pids(runs.glob("*/launch.json"))  # leave no trainer behind


def status_step(page) -> int:
    m = re.search(r"step (\d+)/", page.inner_text("#train-status"))
    return int(m.group(1)) if m else -1


def test_defaults_start_stop_and_resume_from_a_fresh_state(app, browser):
    url, runs = app
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1500, "height": 1400})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    page.wait_for_selector("#generate", timeout=30_000)
    page.get_by_role("tab", name="Train").click()
    page.wait_for_selector("#lab-chain", timeout=10_000)
    assert "No chain yet" in page.inner_text("#lab-chain")
    for stage in ("from_scratch", "vae_adapt", "res_up", "kv_compress", "finetune"):
        assert "not started" in page.inner_text(f"#lab-{stage}-state")
    page.fill("#train-steps input", "3000")  # long enough to be stopped while running
    page.fill("#train-images input", IMAGES)
    page.click("#train-start")  # every other field as it comes: the default stage, config and data
    # Inputs made on demand (world images, features), then training: step >= 5 with the loss drawn.
    page.wait_for_function("/state: running · step ([5-9]|\\d\\d+)\\//.test(document.querySelector("
                           "'#train-status').innerText)", timeout=240_000, polling=200)
    page.wait_for_selector("#loss-plot canvas, #loss-plot svg", timeout=30_000)
    page.wait_for_function("document.querySelector('#lab-finetune-state').innerText.includes('running')",
                           timeout=30_000)
    page.wait_for_selector("#lab-finetune-loss canvas, #lab-finetune-loss svg", timeout=30_000)
    assert "error" not in page.inner_text("#train-status").lower()
    assert page.locator(".toast-body.error").count() == 0
    page.screenshot(path=str(ARTIFACTS / "app-lab-running.png"), full_page=True)

    page.click("#train-stop")
    page.wait_for_function("document.querySelector('#train-status').innerText.includes('state: **stopped**') || "
                           "document.querySelector('#train-status').innerText.includes('state: stopped')",
                           timeout=60_000)
    stopped = status_step(page)
    run = next(runs.glob("finetune-*"))
    assert stopped >= 5 and any((run / "checkpoints").iterdir())

    page.click("#train-resume")
    page.wait_for_function(f"(() => {{ const m = /state: running · step (\\d+)\\//.exec(document.querySelector("
                           f"'#train-status').innerText); return m && +m[1] > {stopped}; }})()",
                           timeout=120_000, polling=200)
    assert f"resumed from {run / 'checkpoints'}" in page.input_value("#train-log textarea") or \
        "resumed from" in (run / "log.txt").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    assert steps[:stopped] == list(range(1, stopped + 1)) and steps[stopped] == stopped + 1  # continued, not restarted
    page.screenshot(path=str(ARTIFACTS / "app-lab-resumed.png"), full_page=True)
    page.click("#train-stop")
    page.wait_for_function("document.querySelector('#train-status').innerText.includes('stopped')", timeout=60_000)
    page.close()


def test_the_tiny_chain_fills_every_stage_and_its_export_is_compared(app, browser):
    """A stage's Start, then Start chain (tiny preset): each stage box ends finished with its ShapesBench score, a
    second browser sees the same, and Compare puts the KV stage's export beside α and Σ."""
    url, runs = app
    page = browser.new_page(viewport={"width": 1500, "height": 1400})
    page.goto(url)
    page.wait_for_selector("#generate", timeout=30_000)
    page.get_by_role("tab", name="Train").click()
    page.wait_for_function("!document.querySelector('#train-status').innerText.includes('state: running')",
                           timeout=60_000)  # the previous test's run has stopped: one trainer at a time
    page.locator("#lab-preset input").fill("tiny")
    page.keyboard.press("Enter")
    page.click("#lab-vae_adapt-start")  # one stage: the chain up to VAE (α, shipped, is scored first)
    page.wait_for_function("document.querySelector('#lab-vae_adapt-state').innerText.includes('finished')",
                           timeout=240_000, polling=500)
    page.wait_for_function("document.querySelector('#lab-chain').innerText.includes('done')", timeout=60_000)
    assert "not started" in page.inner_text("#lab-res_up-state")
    page.click("#lab-start")  # the whole chain: α and VAE are done, so it goes on from res-up
    page.wait_for_function("document.querySelector('#lab-kv_compress-state').innerText.includes('finished') && "
                           "document.querySelector('#lab-chain').innerText.includes('done')", timeout=240_000,
                           polling=500)
    second = browser.new_context().new_page()  # another browser: nothing but the files tells it about the chain
    second.goto(url)
    second.get_by_role("tab", name="Train").click()
    for stage in ("vae_adapt", "res_up", "kv_compress"):
        second.wait_for_function(f"document.querySelector('#lab-{stage}-state').innerText.includes('finished')",
                                 timeout=30_000)
        assert re.search(r"ShapesBench \d\.\d{3} \(count", second.inner_text(f"#lab-{stage}-state"))
    assert "shipped" in second.inner_text("#lab-from_scratch-state")
    second.wait_for_selector("#lab-figure img", timeout=30_000)  # the Fig. 8 plot
    second.screenshot(path=str(ARTIFACTS / "app-lab-chain.png"), full_page=True)
    assert json.loads((runs / "lab" / "chain.json").read_text())["preset"] == "tiny"

    second.reload()  # the model picker reads the finished runs on page load
    second.get_by_role("tab", name="Compare").click()
    second.locator("#compare-model input").click()
    second.get_by_role("option", name="your run: lab/sigma_kv").click()
    second.fill("#compare-prompt textarea", "a red square")
    second.click("#compare")
    second.wait_for_selector("#run-image img", timeout=120_000)
    assert "your run: lab/sigma_kv (kv_compress, step 2)" in second.inner_text("#run-image")
    second.screenshot(path=str(ARTIFACTS / "app-lab-compare.png"), full_page=True)
