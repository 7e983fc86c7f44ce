"""Stopping a run on request: the StopWatcher itself, then real runs stopped mid-training.

    pytest tests/test_preemption.py

The end-to-end tests need no SLURM: a 1-process run is sent SIGTERM and must checkpoint, exit
with EXIT_PREEMPTED and resume to the same weights as an uninterrupted run; a 2-process
`accelerate launch` run is stopped with the stop file, the mechanism the SLURM templates use.
Each run is held inside a known step by its loss until the request is sent (preempt_runs.gate),
so the request always reaches a run that is still training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

from helpers import accelerate_launch_cmd  # noqa: E402
from preempt_runs import (  # noqa: E402
    GATE_STEP,
    REPO,
    TOTAL_STEPS,
    child_env,
    gate,
    make_setup,
    max_weight_diff,
    reference_run,
    stop_process,
    train_cmd,
    wait_for_file,
)

from ddp_finetune.training.preemption import EXIT_PREEMPTED, PREEMPTED_FILE, SIGNALS, STOP_FILE, StopWatcher  # noqa: E402


# ----------------------------------------------------------------------------- StopWatcher
@pytest.fixture
def watcher(tmp_path):
    w = StopWatcher(tmp_path)
    before = {s: signal.getsignal(s) for s in SIGNALS}
    w.install()
    yield w
    w.uninstall()
    assert {s: signal.getsignal(s) for s in SIGNALS} == before, "uninstall must restore the previous handlers"


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_signal_only_sets_the_flag(watcher, sig):
    assert not watcher.requested() and watcher.reason is None
    os.kill(os.getpid(), sig)  # handled before the next line runs
    assert watcher.requested()
    assert watcher.reason == sig.name


def test_second_sigint_aborts_at_once(watcher):
    os.kill(os.getpid(), signal.SIGINT)
    assert watcher.requested()
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next bytecode


def test_other_signals_never_abort(watcher):
    for _ in range(3):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGINT)  # the first SIGINT: still only a request
    assert watcher.reason == "SIGTERM"


def test_stop_file_is_a_request_and_clear_removes_it(tmp_path):
    w = StopWatcher(tmp_path)
    assert not w.requested()
    (tmp_path / STOP_FILE).touch()
    assert w.requested()
    assert w.reason == f"stop file {tmp_path / STOP_FILE}"
    w.clear()
    assert not (tmp_path / STOP_FILE).exists()
    assert w.requested(), "a request, once seen, stays until the run ends"
    w.clear()  # clearing twice is fine


def test_stop_file_is_seen_by_the_first_call_after_it_appears(tmp_path):
    """No clock in between: the loop decides when to ask, and a file that exists is seen then."""
    w = StopWatcher(tmp_path)
    for _ in range(3):
        assert not w.requested()
    (tmp_path / STOP_FILE).touch()
    assert w.requested()


def test_install_off_the_main_thread_is_a_noop(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    errors = []

    def run():
        try:
            StopWatcher(tmp_path).install().uninstall()
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert not errors and signal.getsignal(signal.SIGTERM) is before


def test_exit_code_is_distinct():
    from ddp_finetune.errors import EXIT_USER_ERROR

    assert EXIT_PREEMPTED not in (0, 1, EXIT_USER_ERROR, 130) and 0 < EXIT_PREEMPTED < 126


# ----------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def setup_root(tmp_path_factory):
    # the session's base folder, so tests/test_slurm.py shares the data and the reference run
    return tmp_path_factory.getbasetemp() / "preempt_setup"


@pytest.mark.slow
def test_sigterm_mid_training_checkpoints_and_resumes_to_the_same_weights(setup_root, tmp_path):
    config = make_setup(setup_root)
    out, gate_dir = tmp_path / "run", tmp_path / "gate"
    overrides = gate(gate_dir)
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(
            train_cmd(config, out, *overrides), cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_for_file(gate_dir / "reached.0", proc, what="the 1-process run")
            proc.send_signal(signal.SIGTERM)  # while the run is held inside step GATE_STEP
            (gate_dir / "go").touch()
            rc = proc.wait(120)
        finally:
            stop_process(proc)
    first = (tmp_path / "first.log").read_text()
    assert rc == EXIT_PREEMPTED, first[-3000:]
    step = json.loads((out / PREEMPTED_FILE).read_text())["step"]
    assert GATE_STEP <= step < TOTAL_STEPS, f"stopped at step {step}, not between the request and the end"
    assert (out / "checkpoints" / f"step_{step}").is_dir()
    assert not (out / "summary.json").exists()

    again = subprocess.run(
        train_cmd(config, out, *overrides, "checkpoint.resume=auto"),  # `go` exists: the gate is open
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == TOTAL_STEPS
    assert summary["resumed_from"].endswith(f"step_{step}")
    assert not (out / PREEMPTED_FILE).exists(), "a finished run removes the stale preempted.json"
    diff = max_weight_diff(out / "final" / "model.safetensors", reference_run(setup_root))
    assert diff <= 1e-6, f"resumed run differs from the uninterrupted one by {diff}"


@pytest.mark.slow
def test_preempted_again_right_after_resuming_loses_nothing(setup_root, tmp_path):
    """Stop, resume into a second stop request (already pending at start), resume again."""
    config = make_setup(setup_root)
    out = tmp_path / "run"
    first = subprocess.run(
        train_cmd(config, out, "train.max_steps=3", "checkpoint.every_n_steps=3"),
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    (out / "summary.json").unlink()  # as if the job had been stopped at step 3
    (out / "final" / "model.safetensors").unlink()

    (out / STOP_FILE).touch()  # the next preemption notice arrives while the job restarts
    second = subprocess.run(
        train_cmd(config, out, "checkpoint.resume=auto"),
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == EXIT_PREEMPTED, second.stdout[-2000:] + second.stderr[-2000:]
    step = json.loads((out / PREEMPTED_FILE).read_text())["step"]
    # at the first step boundary where the ranks agree: 4 when they agree at every step
    assert 4 <= step < TOTAL_STEPS, "the resumed run trains at least one step, then stops"
    assert not (out / STOP_FILE).exists(), "an honoured stop request is cleared"

    third = subprocess.run(
        train_cmd(config, out, "checkpoint.resume=auto"),
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step_{step}") and summary["steps"] == TOTAL_STEPS
    diff = max_weight_diff(out / "final" / "model.safetensors", reference_run(setup_root))
    assert diff <= 1e-6, f"twice-preempted run differs from the uninterrupted one by {diff}"


@pytest.mark.slow
def test_stop_file_stops_every_rank_of_an_accelerate_launch(setup_root, tmp_path):
    """2 ranks under torchrun: the stop file reaches both; the launcher's exit status is not
    EXIT_PREEMPTED (torchrun reports 1), which is why the templates read preempted.json."""
    config = make_setup(setup_root)
    out, gate_dir = tmp_path / "run", tmp_path / "gate"
    cmd = [*accelerate_launch_cmd(2), "-m", "ddp_finetune", "train", str(config), f"output_dir={out}", *gate(gate_dir)]
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            for rank in (0, 1):  # both ranks are held inside step GATE_STEP
                wait_for_file(gate_dir / f"reached.{rank}", proc, what="the 2-process run")
            (out / STOP_FILE).touch()
            (gate_dir / "go").touch()
            rc = proc.wait(180)
        finally:
            stop_process(proc)
    text = log_path.read_text()
    assert rc != 0, text[-3000:]
    step = json.loads((out / PREEMPTED_FILE).read_text())["step"]
    assert GATE_STEP <= step < TOTAL_STEPS
    assert (out / "checkpoints" / f"step_{step}").is_dir()
    assert f"exitcode  : {EXIT_PREEMPTED}" in text, "both ranks exit with EXIT_PREEMPTED under torchrun"
    assert not (out / STOP_FILE).exists(), "the honoured stop file is removed, or the resumed run would stop at once"
