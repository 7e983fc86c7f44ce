"""`ddp-finetune sweep` and `sweep-report`: grids of runs, resumed, here or as one SLURM job array.

    pytest tests/test_sweep.py                 # the real-SLURM test also needs -m slurm and root

First the parts that train nothing: the grid, the element names, the manifest, bad input (one
line, exit 2). Then a 2 x 2 sweep (2 learning rates x 2 seeds, resnet18 on 16 px, 1 epoch) run
here: stopped inside its first element, re-run to resume it and run the rest, re-run again to
skip everything; its report is checked against the elements' summary.json. The same grid is then
submitted as a job array (a stand-in sbatch records the submission, the array tasks run through
the real slurm/cpu.sbatch with a stand-in srun), another element preempted by SLURM's warning
signal and requeued: its report must equal the local sweep's byte for byte. On a real SLURM
cluster (`-m slurm`, slurm/local/) the same array runs end to end. A failed element (two run at
once) is recorded, reported and retried.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

from preempt_runs import REPO, child_env, gate, make_setup, stop_process, wait_for_file  # noqa: E402

from ddp_finetune.commands.cli import main  # noqa: E402
from ddp_finetune.commands.sweep import (  # noqa: E402
    array_spec,
    element_args,
    element_names,
    parse_seeds,
    prepare_sweep,
    read_manifest,
    report,
    split_values,
    status_of,
)
from ddp_finetune.errors import EXIT_USER_ERROR  # noqa: E402
from ddp_finetune.training.preemption import EXIT_PREEMPTED, STOP_FILE  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent / "scripts"
GRID = ["optim.lr=0.01,0.02", "train.epochs=1"]
SEEDS = "0-1"
NAMES = ["lr-0.01_seed-0", "lr-0.01_seed-1", "lr-0.02_seed-0", "lr-0.02_seed-1"]


# ============================================================================ no training
def test_values_split_on_top_level_commas_only():
    assert split_values("0.01,0.03") == ["0.01", "0.03"]
    assert split_values("[0.9,0.99],[0.8,0.9]") == ["[0.9,0.99]", "[0.8,0.9]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert split_values("{a: 1, b: 2}") == ["{a: 1, b: 2}"]


@pytest.mark.parametrize("text, seeds", [("0-2", [0, 1, 2]), ("0,5,7", [0, 5, 7]), ("3", [3]), ("0-1,4", [0, 1, 4])])
def test_seeds(text, seeds):
    assert parse_seeds(text) == seeds


def test_names_are_readable_safe_and_unique():
    keys = ["optim.lr", "model.name", "seed"]
    combos = [("0.01", "timm/resnet18", "0"), ("1e-3", "timm resnet18", "0")]
    # '/' and ' ' are not safe in a folder name: they become '-'
    assert element_names(keys, combos) == ["lr-0.01_name-timm-resnet18_seed-0", "lr-1e-3_name-timm-resnet18_seed-0"]
    assert element_names(["a.x", "b.x"], [("1", "2")]) == ["a.x-1_b.x-2"]  # same last part: the whole key
    collide = element_names(["model.name"], [("a/b",), ("a b",)])  # equal once safe: each gets its index
    assert collide == ["name-a-b_0", "name-a-b_1"]


def test_array_spec():
    assert array_spec([0, 1, 2, 3], 2) == "0-3%2"
    assert array_spec([0, 1, 2, 5, 7, 8], None) == "0-2,5,7-8"
    assert array_spec([3], 1) == "3%1"


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    # load_config checks keys and values, not whether the data exist
    path.write_text(f"data: {{path: {tmp_path / 'images'}}}\nmodel: {{name: resnet18}}\n")
    return path


def test_manifest_holds_the_grid_and_every_elements_overrides(tmp_path, config):
    out = tmp_path / "sw"
    sweep_dir, manifest = prepare_sweep(str(config), [*GRID], SEEDS, out)
    assert read_manifest(sweep_dir) == manifest
    assert manifest["grid"] == {
        "overrides": ["train.epochs=1"],
        "swept": {"optim.lr": ["0.01", "0.02"], "seed": ["0", "1"]},
    }
    assert [e["name"] for e in manifest["elements"]] == NAMES
    assert manifest["elements"][1]["overrides"] == [
        "train.epochs=1",
        "optim.lr=0.01",
        "seed=1",
        f"output_dir={out / NAMES[1]}",
    ]
    assert (out / "config.yaml").read_text() == config.read_text()
    assert element_args(out / "sweep.json", 2) == [str(out / "config.yaml"), *manifest["elements"][2]["overrides"]]
    # the same command again: the same manifest, nothing rewritten
    mtime = (out / "sweep.json").stat().st_mtime_ns
    assert prepare_sweep(str(config), [*GRID], SEEDS, out)[1] == manifest
    assert (out / "sweep.json").stat().st_mtime_ns == mtime


def one_line_error(capsys, argv, *fragments) -> str:
    assert main([str(a) for a in argv]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddp-finetune: error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


@pytest.mark.parametrize(
    "tokens, fragments",
    [
        (["train.epochs=1"], ["nothing to sweep", "--seeds 0-2"]),
        (["optim.lr=0.1,0.1"], ["repeats a value"]),
        (["optim.lr=0.1,"], ["empty value"]),
        (["optim.lr=0.1,0.2", "optim.lr=0.3"], ["optim.lr is given twice"]),
        (["optim.lr=0.1,0.2", "output_dir=x"], ["output_dir cannot be set", "--out"]),
        (["optim.lr=0.1,0.2", "checkpoint.resume=never"], ["checkpoint.resume cannot be set"]),
        (["optim.lr=0.1,fast"], ["element lr-fast", "optim.lr"]),
        (["optim.lrr=0.1,0.2"], ["unknown config key 'optim.lrr'"]),
        (["optim.lr=0.1,0.2", "--seeds", "2-0"], ["--seeds '2-0'"]),
        (["seed=1,2", "--seeds", "0-1"], ["seed is given both"]),
        (["optim.lr=0.1,0.2", "--max-parallel", "0"], ["--max-parallel 0"]),
        (["optim.lr=0.1,0.2", "--sbatch", "-p x"], ["--sbatch options are for --slurm"]),
        (["optim.lr=0.1,0.2", "--slurm", "nope.sbatch"], ["nope.sbatch", "does not exist"]),
    ],
)
def test_bad_sweep_input_is_one_line_and_writes_nothing(tmp_path, config, capsys, tokens, fragments):
    out = tmp_path / "sw"
    one_line_error(capsys, ["sweep", config, *tokens, "--out", out], *fragments)
    # a --slurm refusal comes after the manifest (a re-run resumes it); everything else before any file
    assert not (out / "sweep.json").exists() or "--slurm" in tokens


def test_another_grid_into_the_same_folder_is_refused(tmp_path, config, capsys):
    out = tmp_path / "sw"
    prepare_sweep(str(config), [*GRID], SEEDS, out)
    before = (out / "sweep.json").read_text()
    one_line_error(capsys, ["sweep", config, "optim.lr=0.01,0.05", "train.epochs=1", "--seeds", SEEDS, "--out", out],
                   "holds another sweep", "optim.lr=0.01,0.02", "optim.lr=0.01,0.05", "another --out")  # fmt: skip
    config.write_text(config.read_text() + "seed: 3\n")
    one_line_error(capsys, ["sweep", config, *GRID, "--seeds", SEEDS, "--out", out], "changed since the sweep")
    assert (out / "sweep.json").read_text() == before


def test_report_and_element_bad_input(tmp_path, config, capsys):
    one_line_error(capsys, ["sweep-report", tmp_path / "none"], "does not exist", "--out folder")
    out = tmp_path / "sw"
    prepare_sweep(str(config), [*GRID], SEEDS, out)
    one_line_error(capsys, ["sweep-element", out / "sweep.json", "7"], "element 7", "0-3")
    assert main(["sweep-element", str(out), "0"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        str(out / "config.yaml"),
        *read_manifest(out)["elements"][0]["overrides"],
    ]


def test_report_of_a_sweep_with_nothing_finished_lists_every_element(tmp_path, config, capsys):
    out = tmp_path / "sw"
    prepare_sweep(str(config), [*GRID], SEEDS, out)
    assert main(["sweep-report", str(out)]) == 0
    md = (out / "results.md").read_text()
    for name in NAMES:
        assert f"- {name}: not started" in md
    assert "no element has finished" in capsys.readouterr().err


# ============================================================================ a sweep that trains
def sweep_cmd(config: Path, out: Path, gate_dir: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "ddp_finetune", "sweep", str(config), *GRID, *gate(gate_dir), "--seeds", SEEDS,
            "--out", str(out), *extra]  # fmt: skip


def run(cmd, timeout=600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=child_env(**env), capture_output=True, text=True, timeout=timeout)


def summaries(out: Path) -> dict[str, dict]:
    return {n: json.loads((out / n / "summary.json").read_text()) for n in NAMES}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    return make_setup(tmp_path_factory.mktemp("sweep_setup"))


@pytest.fixture(scope="module")
def local_sweep(setup, tmp_path_factory):
    """The 2 x 2 sweep here, stopped by SIGTERM inside its first element, then re-run twice: (folder, outputs)."""
    root = tmp_path_factory.mktemp("local_sweep")
    out, gate_dir = root / "sw", root / "gate"
    cmd = sweep_cmd(setup, out, gate_dir)
    first = subprocess.Popen(
        cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # every element is held at step 3 until `go` exists: the first one is there now
        wait_for_file(gate_dir / "reached.0", first, what="the sweep's first element")
        first.send_signal(signal.SIGTERM)
        # the sweep's answer: the running element's stop file, the request the SLURM templates make
        wait_for_file(out / NAMES[0] / STOP_FILE, first, what="the sweep's signal handler")
        (gate_dir / "go").touch()
        stopped, _ = first.communicate(timeout=300)
    finally:
        stop_process(first)
    status = {n: status_of(out / n) for n in NAMES}
    report(out)  # of a sweep half done
    partial = (out / "results.md").read_text()
    resumed = run(cmd)
    again = run(cmd)
    return out, {"stopped": (first.returncode, stopped, status, partial), "resumed": resumed, "again": again}


@pytest.mark.slow
def test_a_stopped_sweep_resumes_its_element_and_skips_finished_ones(local_sweep):
    out, runs = local_sweep
    code, text, status, partial = runs["stopped"]
    assert code == EXIT_PREEMPTED, text
    assert status == dict(zip(NAMES, ["preempted", "not started", "not started", "not started"]))
    assert f"- {NAMES[0]}: preempted" in partial and f"- {NAMES[3]}: not started" in partial
    assert "SIGTERM: the running elements checkpoint" in text and f"{NAMES[0]}: stopped" in text
    assert "re-run the same command to resume" in text and "lr-0.01_seed-1: started" not in text
    assert not (out / NAMES[0] / STOP_FILE).exists(), "the run removes the request it answered"
    resumed = runs["resumed"]
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "4 elements, 0 finished (skipped), 4 to run" in resumed.stdout
    log = (out / NAMES[0] / "sweep.log").read_text()
    assert "resumed from" in log, log[-3000:]
    assert summaries(out)[NAMES[0]]["resumed_from"] is not None
    assert all(s["resumed_from"] is None for n, s in summaries(out).items() if n != NAMES[0])
    again = runs["again"]
    assert again.returncode == 0 and "4 finished (skipped), 0 to run" in again.stdout, again.stdout + again.stderr
    assert "started" not in again.stdout


@pytest.mark.slow
def test_report_of_the_local_sweep(local_sweep):
    out, _ = local_sweep
    proc = run([sys.executable, "-m", "ddp_finetune", "sweep-report", str(out)])
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    top1 = {n: s["val"]["top1"] for n, s in summaries(out).items()}
    expected = {lr: [top1[f"lr-{lr}_seed-{s}"] for s in (0, 1)] for lr in ("0.01", "0.02")}
    assert [r["optim.lr"] for r in rows] == ["0.01", "0.02"]
    for row in rows:
        scores = expected[row["optim.lr"]]
        assert row["metric"] == "val/top1" and row["n"] == "2" and float(row["mean"]) == statistics.fmean(scores)
        assert float(row["std"]) == statistics.stdev(scores)
        assert (float(row["min"]), float(row["max"])) == (min(scores), max(scores))
    best = max(expected, key=lambda lr: statistics.fmean(expected[lr]))
    assert [r["optim.lr"] for r in rows if r["best"] == "1"] == [best]
    md = (out / "results.md").read_text()
    assert "**best**" in md and "none: every element finished" in md and "val/top1" in md
    assert (out / "results.png").stat().st_size > 1000
    # another metric, lower is better
    assert run([sys.executable, "-m", "ddp_finetune", "sweep-report", str(out), "--metric", "val/loss"]).returncode == 0
    assert "val/loss (min)" in (out / "results.md").read_text()
    bad = run([sys.executable, "-m", "ddp_finetune", "sweep-report", str(out), "--metric", "val/top9"])
    assert bad.returncode == EXIT_USER_ERROR and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "val/top1" in bad.stderr  # the metrics there are


# ============================================================================ a job array, stand-ins for sbatch / srun
def fake_bin(root: Path) -> tuple[Path, Path]:
    """sbatch (records its arguments, answers a job id), scontrol and srun (tests/scripts/slurm_fake_*)."""
    bin_dir, log = root / "bin", root / "slurm_calls.log"
    bin_dir.mkdir(parents=True)
    log.touch()
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "sbatch $*" >>{log}\necho 4300\n')
    for name in ("scontrol", "srun"):
        (bin_dir / name).write_text(f'#!/bin/bash\nexec bash {SCRIPTS / f"slurm_fake_{name}"} "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir, log


def array_task_env(bin_dir: Path, log: Path, index: int, restart: int = 0) -> dict:
    """What a batch shell of array task `index` sees: a 1-node, 1-CPU allocation of its own job id."""
    env = {k: v for k, v in child_env().items() if not k.startswith("SLURM")}
    for k in ("PROCS_PER_NODE", "MAIN_ADDR", "MAIN_PORT", "DRY_RUN", "SETUP", "REQUEUE", "DDPF_SLURM_DIR"):
        env.pop(k, None)
    env.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHON=sys.executable,
        FAKE_SLURM_LOG=str(log),
        FAKE_HOSTS="n1",
        FAKE_SRUN="tasks",  # the fake srun runs the node's launch line: the real training
        SLURM_JOB_ID=str(4301 + index),
        SLURM_ARRAY_JOB_ID="4300",
        SLURM_ARRAY_TASK_ID=str(index),
        SLURM_JOB_NUM_NODES="1",
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST="n1",
        SLURM_NODEID="0",
        SLURMD_NODENAME="n1",
        SLURM_CPUS_PER_TASK="1",
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_RESTART_COUNT=str(restart),
    )
    return env


def array_task(out: Path, env: dict) -> list[str]:
    return ["bash", str(REPO / "slurm" / "cpu.sbatch"), str(out / "sweep.json")]


@pytest.mark.slow
def test_job_array_with_a_preempted_element_reports_what_the_local_sweep_reports(setup, local_sweep, tmp_path):
    out, gate_dir = tmp_path / "sw", tmp_path / "gate"
    bin_dir, log = fake_bin(tmp_path)
    path_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    submit = run(sweep_cmd(setup, out, gate_dir, "--slurm", "slurm/cpu.sbatch", "--max-parallel", "2"), **path_env)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    sbatch = [c for c in log.read_text().splitlines() if c.startswith("sbatch ")]
    assert len(sbatch) == 1, "ONE job array"
    argv = sbatch[0].split()
    assert "--array=0-3%2" in argv and argv[-2:] == [str(REPO / "slurm" / "cpu.sbatch"), str(out / "sweep.json")]
    assert f"--output={out}/logs/%A_%a.out" in argv

    # SLURM starts the tasks; the last one gets the warning signal inside step 3
    victim = 3
    task = subprocess.Popen(array_task(out, {}), cwd=REPO, env=array_task_env(bin_dir, log, victim),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_for_file(gate_dir / "reached.0", task, what=f"array task {victim}")
        task.send_signal(signal.SIGUSR1)  # `--signal=B:USR1@120`: the batch shell only
        wait_for_file(out / NAMES[victim] / STOP_FILE, task, what="the batch shell's trap")
        (gate_dir / "go").touch()
        text, _ = task.communicate(timeout=300)
    finally:
        stop_process(task)
    assert task.returncode == EXIT_PREEMPTED, text
    assert f"sweep element {victim} of {out / 'sweep.json'}" in text
    assert "requeue 4304" in log.read_text().splitlines(), "the task requeues its own job id"
    for index in range(3):
        done = run(array_task(out, {}), **array_task_env(bin_dir, log, index))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # a re-submission while the requeued task waits would send only what is unfinished
    again = run(sweep_cmd(setup, out, gate_dir, "--slurm", "slurm/cpu.sbatch", "--max-parallel", "2"), **path_env)
    assert again.returncode == 0, again.stderr
    assert "--array=3%2" in log.read_text().splitlines()[-1].split()

    resumed = run(array_task(out, {}), **array_task_env(bin_dir, log, victim, restart=1))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {out / NAMES[victim] / 'checkpoints'}" in resumed.stdout
    assert summaries(out)[NAMES[victim]]["resumed_from"] is not None

    done = run(sweep_cmd(setup, out, gate_dir, "--slurm", "slurm/cpu.sbatch"), **path_env)
    assert "all 4 elements finished; nothing to submit" in done.stdout
    for folder in (out, local_sweep[0]):
        assert run([sys.executable, "-m", "ddp_finetune", "sweep-report", str(folder)]).returncode == 0
    # different elements were interrupted here and there: exact resumes give the same table
    assert (out / "results.csv").read_text() == (local_sweep[0] / "results.csv").read_text()


def test_array_task_with_a_bad_index_is_one_line(tmp_path, config):
    out = tmp_path / "sw"
    prepare_sweep(str(config), [*GRID], SEEDS, out)
    bin_dir, log = fake_bin(tmp_path)
    proc = run(array_task(out, {}), **array_task_env(bin_dir, log, 9))
    assert proc.returncode == EXIT_USER_ERROR
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "element 9 is not in" in lines[0], proc.stderr
    assert not [c for c in log.read_text().splitlines() if c.startswith("srun")], "nothing launched"


# ============================================================================ a real SLURM cluster
@pytest.mark.slurm
def test_job_array_on_a_real_cluster(setup, local_sweep, tmp_path_factory):
    """slurm/local/ with two fake nodes: one array of 4 tasks, one at a time; the first to run is
    stopped inside step 3 (its stop file), requeued (Restarts=1) and resumed;
    the report equals the local sweep's. Not run where the cluster cannot be installed (no root,
    no packages): it skips with the reason."""
    from test_slurm import TERMINAL, _start_cluster, job_info

    started, reason = _start_cluster()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm_sweep")
    out, gate_dir = root / "sw", root / "gate"
    submit = run(sweep_cmd(setup, out, gate_dir, "--slurm", "slurm/cpu.sbatch", "--max-parallel", "1",
                           "--sbatch", f"--chdir={REPO} --cpus-per-task=1"), PYTHON=sys.executable)  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job = submit.stdout.split("submitted job array ")[1].split()[0]
    tasks = [f"{job}_{i}" for i in range(4)]
    try:
        wait_for_file(gate_dir / "reached.0", timeout=300, what=f"array {job}")
        # one task at a time (%1): the one running now is the one held inside step 3
        victim = [i for i, t in enumerate(tasks) if job_info(t).get("JobState") == "RUNNING"][0]
        # the stop file, the request the batch shell's trap makes of a warning signal ("By hand" in
        # slurm/README.md): `scancel --signal=USR1` of an array task was refused ("Job can not be
        # altered now, try again later", retried for ~90 s) on this SLURM 22.05, --full and --batch alike
        (out / NAMES[victim] / STOP_FILE).touch()
        (gate_dir / "go").touch()
        deadline = time.monotonic() + 900
        while not all(job_info(t).get("JobState") in TERMINAL for t in tasks):
            assert time.monotonic() < deadline, f"array {job} did not end: {[job_info(t) for t in tasks]}"
            time.sleep(2)
        infos = [job_info(t) for t in tasks]
        assert [i["JobState"] for i in infos] == ["COMPLETED"] * 4, infos
        assert [i["Restarts"] for i in infos] == ["1" if i == victim else "0" for i in range(4)], infos
        assert "(restart 1)" in (out / "logs" / f"{job}_{victim}.out").read_text(), "one log across the requeue"
    finally:
        subprocess.run(["scancel", job])
        if started:
            subprocess.run(["bash", str(REPO / "slurm" / "local" / "start-local-slurm.sh"), "stop"], timeout=180)
    for folder in (out, local_sweep[0]):
        assert run([sys.executable, "-m", "ddp_finetune", "sweep-report", str(folder)]).returncode == 0
    assert (out / "results.csv").read_text() == (local_sweep[0] / "results.csv").read_text()


@pytest.mark.slow
def test_a_failed_element_is_recorded_and_the_others_still_run(setup, tmp_path):
    """Two elements at once; the second stops at start-up with a UserError (a batch larger than the
    data): the sweep exits 1 naming it, its failed.json holds the error line, the report lists it, and a re-run
    retries only it."""
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "ddp_finetune", "sweep", str(setup), "train.batch_size=8,1000", "train.max_steps=1",
           "--max-parallel", "2", "--out", str(out)]  # fmt: skip
    proc = run(cmd)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        "2 to run, 2 at a time" in proc.stdout
        and "batch_size-1000: FAILED (exit 2)" in proc.stdout
        and "failed: batch_size-1000" in proc.stdout
    )
    failed = json.loads((out / "batch_size-1000" / "failed.json").read_text())
    assert failed["exit_code"] == EXIT_USER_ERROR and "train.batch_size=1000" in failed["last_line"]
    assert status_of(out / "batch_size-8") == "finished" and status_of(out / "batch_size-1000") == "failed"
    result = report(out)
    assert [s.stats()["n"] for s in result["settings"]] == [1, 0]
    assert result["missing"] == [("batch_size-1000", "failed", failed["last_line"])]
    assert "- batch_size-1000: failed (ddp-finetune: error: the training split has" in (out / "results.md").read_text()
    again = run(cmd)
    assert again.returncode == 1 and "1 finished (skipped), 1 to run" in again.stdout, again.stdout
