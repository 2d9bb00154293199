"""One trainer per folder (``train.runlock``), under truly concurrent calls: threads behind a barrier calling the
app's own Start, Resume and Start-chain handlers, and real processes of the trainer's command lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fixtures import fake_manager, make_encoders, make_images, wait_for, write_config

from train.config import load_config
from train.extract import extract
from train.runlock import EXIT_BUSY, LOCK, FolderBusy, acquire, holder, spawn

REPO = Path(__file__).resolve().parent.parent
CHILD_HOLDS = "import sys, time; from train.runlock import acquire; acquire(sys.argv[1]); print('held', flush=True); " \
              "time.sleep(60)"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def together(n: int, call) -> list[tuple[str, object]]:
    """``call(i)`` on ``n`` threads released at once; each result as ("ok", value) or ("error", exception)."""
    barrier, out = threading.Barrier(n), [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = ("ok", call(i))
        except Exception as e:  # noqa: BLE001 - the refusal is the result under test
            out[i] = ("error", e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


# --- the lock itself -------------------------------------------------------------------------------------------

def test_one_of_many_threads_gets_the_folder_and_the_others_are_told_who(tmp_path):
    results = together(6, lambda i: acquire(tmp_path / "run", doing=f"thread {i}"))
    won = [v for k, v in results if k == "ok"]
    lost = [v for k, v in results if k == "error"]
    assert len(won) == 1 and len(lost) == 5 and all(isinstance(e, FolderBusy) for e in lost)
    assert all(f"pid {os.getpid()} (this process)" in str(e) and str(tmp_path / "run") in str(e) for e in lost)
    assert holder(tmp_path / "run")["pid"] == os.getpid() and holder(tmp_path / "run")["doing"].startswith("thread")
    won[0].release()
    outer = acquire(tmp_path / "run")
    with acquire(tmp_path / "run"):  # re-entrant for the holding thread (prepare, then train, in one process)
        pass
    assert together(1, lambda i: acquire(tmp_path / "run"))[0][0] == "error"  # still held by the outer hold
    outer.release()
    assert together(1, lambda i: acquire(tmp_path / "run").release())[0][0] == "ok"  # free once all are given back


def test_another_process_is_refused_at_once_and_kill_9_frees_the_folder(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD_HOLDS, str(tmp_path / "run")], env=_env(),
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(FolderBusy, match=f"{tmp_path / 'run'} is held by another trainer \\(pid {child.pid}"):
            acquire(tmp_path / "run")
        assert time.monotonic() - t0 < 1.0  # at once, not after a timeout
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    acquire(tmp_path / "run").release()  # the OS dropped the dead holder's lock: nothing stale to clean


def test_a_spawned_child_holds_the_lock_it_was_handed_and_adopts_it(tmp_path):
    adopt = CHILD_HOLDS.replace("'held'", "'adopted'")
    with acquire(tmp_path / "run", doing="starting") as lease:
        child = spawn([sys.executable, "-c", adopt, str(tmp_path / "run")], [lease], env=_env(),
                      stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "adopted"  # its own acquire took the inherited lock
        with pytest.raises(FolderBusy, match=f"pid {child.pid}"):  # the parent let go: the child holds it alone
            acquire(tmp_path / "run")
        assert holder(tmp_path / "run")["pid"] == child.pid
    finally:
        child.kill()
        child.wait()
    acquire(tmp_path / "run").release()


# --- the app's handlers ----------------------------------------------------------------------------------------

@pytest.fixture
def app(tmp_path, monkeypatch, tiny_pipeline):
    """The Train tab's real handlers (by name) over a RunManager whose trainer is a stand-in module."""
    import gradio as gr  # noqa: F401 - the demo below

    from pixsigma.pipeline import PixSigmaPipeline
    from pixsigma_ui.engine import MAIN, AppEngine
    from pixsigma_ui.server import build_demo

    manager = fake_manager(tmp_path, monkeypatch)
    engine = AppEngine({MAIN: PixSigmaPipeline.from_pretrained(str(tiny_pipeline), device="cpu")})
    demo = build_demo(engine, runs=manager)
    handlers = {f.fn.__qualname__.replace(".<locals>", ""): f.fn for f in demo.fns.values() if f.fn is not None}
    yield manager, handlers
    for child in manager._children.values():
        child.kill()
        child.wait()


def _alive(manager) -> list[str]:
    return [n for n, c in manager._children.items() if c.poll() is None]


def _refusals(results) -> list[str]:
    return [str(getattr(v, "message", v)) for k, v in results if k == "error"]


def test_two_starts_at_once_give_one_trainer(app, monkeypatch):
    import pixsigma_ui.train_tab

    manager, h = app
    monkeypatch.setenv("FAKE_TRAIN_DELAY", "0.05")
    monkeypatch.setattr(pixsigma_ui.train_tab.time, "strftime", lambda fmt, *t: "20260101-120000")  # one name
    start = h["build_train_tab.on_start"]
    results = together(2, lambda i: start("finetune", None, "", 400, 1e-4, 2))
    assert [k for k, _ in results].count("ok") == 1, results
    (refusal,) = _refusals(results)
    assert "one training run at a time" in refusal
    assert manager.runs() == ["finetune-20260101-120000"] and len(_alive(manager)) == 1
    name = manager.runs()[0]
    wait_for(manager, name, lambda s: s.get("step", 0) >= 3)
    rows = [json.loads(r)["step"] for r in (manager.runs_dir / name / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, len(rows) + 1))  # one writer: no step twice


def test_two_resumes_and_a_start_give_one_trainer(app, monkeypatch):
    manager, h = app
    monkeypatch.setenv("FAKE_TRAIN_DELAY", "0.05")
    name = manager.start("kv_compress", steps=400)
    wait_for(manager, name, lambda s: s.get("step", 0) >= 2)
    manager.stop(name)
    wait_for(manager, name, lambda s: s["state"] == "stopped" and not s["alive"])
    monkeypatch.setenv("FAKE_TRAIN_DELAY", "0.001")  # whichever wins runs its steps quickly
    resume, start = h["build_train_tab.on_resume"], h["build_train_tab.on_start"]
    results = together(3, lambda i: resume(name) if i < 2 else start("finetune", None, "", 400, 1e-4, 2))
    assert [k for k, _ in results].count("ok") == 1, results
    assert len(_alive(manager)) == 1
    if results[2][0] == "error":  # the resume won: the run continues from its checkpoint, once
        wait_for(manager, name, lambda s: s["state"] == "finished" and not s["alive"])
        steps = [json.loads(r)["step"] for r in (manager.folder(name) / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 401))


def test_resume_right_after_stop_waits_for_the_step_in_hand(app, monkeypatch):
    manager, h = app
    monkeypatch.setenv("FAKE_TRAIN_DELAY", "1.0")  # a step takes a second: Stop is honoured at its end
    name = manager.start("kv_compress", steps=3)
    wait_for(manager, name, lambda s: s["state"] == "running")
    h["build_train_tab.on_stop"](name)
    t0 = time.monotonic()
    h["build_train_tab.on_resume"](name)  # not refused: it waits for the stopping trainer to let go
    assert time.monotonic() - t0 > 0.1
    s = wait_for(manager, name, lambda s: s["state"] == "finished" and not s["alive"], timeout=60)
    assert s["step"] == 3


def test_resume_says_how_long_the_trainer_has_been_stopping(app, monkeypatch):
    manager, h = app
    manager.exit_wait_s = 0.5
    monkeypatch.setenv("FAKE_TRAIN_DELAY", "4.0")
    name = manager.start("kv_compress", steps=3)
    wait_for(manager, name, lambda s: s["state"] == "running")
    manager.stop(name)
    with pytest.raises(Exception, match=f"run {name} was asked to stop [0-9]+ s ago and is still finishing its "
                                        "step .*pid [0-9]+.* try again once it reads stopped"):
        h["build_train_tab.on_resume"](name)
    assert len(_alive(manager)) == 1  # the stopping trainer alone


def test_two_start_chain_clicks_give_one_chain(app, tmp_path):
    manager, h = app
    fake_python = tmp_path / "fakepython"  # the chain's command, standing in for `python -m train.chain ...`
    fake_python.write_text("#!/bin/sh\nexec sleep 30\n")
    fake_python.chmod(0o755)
    manager.python = str(fake_python)
    start_chain = h["build_lab.on_start"]
    results = together(2, lambda i: start_chain("tiny", "shipped"))
    assert [k for k, _ in results].count("ok") == 1, results
    (refusal,) = _refusals(results)
    assert "one training run at a time" in refusal
    record = json.loads((manager.lab_dir / "chain_run.json").read_text())
    try:
        with pytest.raises(FolderBusy, match=f"pid {record['pid']}"):  # the chain's process holds both locks
            acquire(manager.lab_dir)
        with pytest.raises(FolderBusy, match=f"pid {record['pid']}"):
            acquire(manager.runs_dir)
        with pytest.raises(Exception, match="the chain is still going: stop it first"):
            h["build_train_tab.on_start"]("finetune", None, "", 5, 1e-4, 2)
    finally:
        os.kill(record["pid"], signal.SIGKILL)


def test_start_chain_right_after_a_chain_ends_waits_for_its_process_to_exit(app, tmp_path):
    """The chain writes "done" a moment before its process exits: a click then is not refused, it waits."""
    manager, h = app
    fake_python = tmp_path / "fakepython"  # `python -m train.chain --preset P --runs-dir LAB ...`: $6 is LAB
    fake_python.write_text('#!/bin/sh\nsleep 0.5\necho \'{"state": "done"}\' > "$6/chain_run.json"\nsleep 2\n')
    fake_python.chmod(0o755)
    manager.python = str(fake_python)
    start_chain = h["build_lab.on_start"]
    start_chain("tiny", "shipped")
    first = json.loads((manager.lab_dir / "chain_run.json").read_text())["pid"]
    end = time.monotonic() + 30
    while json.loads((manager.lab_dir / "chain_run.json").read_text()).get("state") != "done":
        assert time.monotonic() < end
        time.sleep(0.05)
    assert os.path.exists(f"/proc/{first}")  # done, still exiting
    t0 = time.monotonic()
    start_chain("tiny", "shipped")
    assert time.monotonic() - t0 > 0.5  # it waited for the first chain's process
    second = json.loads((manager.lab_dir / "chain_run.json").read_text())["pid"]
    assert second != first and holder(manager.lab_dir)["pid"] == second


# --- the command lines -----------------------------------------------------------------------------------------

def _cache(tmp_path: Path) -> Path:
    """A tiny feature cache (8 images) for the trainer's command lines."""
    enc = make_encoders(tmp_path / "enc")
    data = {"source": str(make_images(tmp_path / "imgs")), "cache": str(tmp_path / "cache"),
            "text_encoder": str(enc), "vae": str(enc)}
    extract(load_config(write_config(tmp_path / "x.yaml", stage="from_scratch", data=data)))
    return tmp_path / "cache"


def test_two_trainer_processes_on_one_folder_one_trains(tmp_path):
    cfg = write_config(tmp_path / "run.yaml", stage="from_scratch", data={"cache": str(_cache(tmp_path))},
                       steps=100_000, save_every=100_000, sample_every=0)
    run = tmp_path / "same"
    cmd = [sys.executable, "-m", "train.prepare", str(cfg), "--runs-dir", str(tmp_path / "runs"),
           "--set", f"output_dir={run}"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        loser = None
        end = time.monotonic() + 240
        while loser is None and time.monotonic() < end:
            loser = next((p for p in procs if p.poll() is not None), None)
            time.sleep(0.1)
        assert loser is not None, "neither trainer was refused"
        winner = procs[1 - procs.index(loser)]
        err = loser.stderr.read()
        assert loser.returncode == EXIT_BUSY, err[-2000:]
        assert f"{run} is held by another trainer (pid {winner.pid}" in err
        while not (run / "metrics.jsonl").is_file() and winner.poll() is None:
            time.sleep(0.1)
        (run / "STOP").touch()  # the winner checkpoints and stops
        assert winner.wait(120) == 0, winner.stderr.read()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    steps = [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one trainer's rows
    assert (run / "log.txt").read_text().count("running from step 0") == 1


def test_the_chain_command_is_refused_while_its_folder_is_held(tmp_path):
    lab = tmp_path / "lab"
    with acquire(lab, doing="chain"):
        proc = subprocess.run([sys.executable, "-m", "train.chain", "--preset", "tiny", "--runs-dir", str(lab)],
                              env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BUSY and f"{lab} is held by another trainer (pid {os.getpid()}" in proc.stderr
    assert sorted(p.name for p in lab.iterdir()) == [LOCK]  # nothing written by the refused chain


def test_the_trainer_the_app_starts_adopts_the_locks_it_is_handed(tmp_path):
    """What Start does: the runs folder's and the run's locks taken, handed to ``python -m train.prepare``, which
    takes its run folder's lock itself (adopting the inherited one) and trains; both are free when it exits."""
    cfg = write_config(tmp_path / "run.yaml", stage="from_scratch", data={"cache": str(_cache(tmp_path))}, steps=2,
                       sample_every=0)
    runs, run = tmp_path / "runs", tmp_path / "runs" / "handed"
    with acquire(runs, doing="starting") as slot, acquire(run, doing="training") as lease:
        proc = spawn([sys.executable, "-m", "train.prepare", str(cfg), "--runs-dir", str(runs), "--set",
                      f"output_dir={run}"], [slot, lease], env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    with pytest.raises(FolderBusy, match=f"pid {proc.pid}"):
        acquire(runs)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    acquire(runs).release()
    acquire(run).release()
