"""The SLURM templates (slurm/*.sbatch + slurm/common.sh).

    pytest tests/test_slurm.py          # as root: also starts a local SLURM cluster (slurm/local/)

First without SLURM: the templates run under bash with a fake allocation (SLURM_* variables)
and stand-ins for `scontrol` and `srun` (tests/scripts/slurm_fake_*), which show the launch line
every node would run, the bad-input errors, and what the job does after each outcome.

Then, on a real SLURM 22.05 started from slurm/local/start-local-slurm.sh with two fake nodes:
1 node x 2 ranks and 2 nodes x 1 rank train the same weights as 1 process, and a job signalled
mid-epoch checkpoints, requeues itself (same job id), resumes and ends with the same weights.
Those are skipped, with the reason printed, where the cluster cannot be installed or started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

from preempt_runs import (  # noqa: E402
    GATE_STEP,
    REPO,
    TOTAL_STEPS,
    child_env,
    gate,
    make_setup,
    max_weight_diff,
    reference_run,
    wait_for_file,
)

from ddp_finetune.training.preemption import EXIT_PREEMPTED, PREEMPTED_FILE, STOP_FILE  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent / "scripts"
START_SCRIPT = REPO / "slurm" / "local" / "start-local-slurm.sh"
TEMPLATES = ("cpu.sbatch", "single_node.sbatch", "multi_node.sbatch")
PREFIX = "ddp-finetune slurm: "


# ============================================================================ without SLURM
class FakeSlurm:
    """A fake allocation: runs a template with bash, SLURM_* set, fake scontrol/srun on PATH."""

    def __init__(self, root: Path):
        self.root = root
        bin_dir = root / "bin"
        bin_dir.mkdir()
        for name in ("scontrol", "srun"):  # wrappers: work whether or not git kept the x bit
            (bin_dir / name).write_text(f'#!/bin/bash\nexec bash {SCRIPTS / f"slurm_fake_{name}"} "$@"\n')
            (bin_dir / name).chmod(0o755)
        self.log = root / "slurm_calls.log"
        self.log.touch()
        self.out = root / "out"
        self.config = root / "config.yaml"
        # load_config checks keys and values, not whether the data exists
        self.config.write_text(f"output_dir: {self.out}\ndata: {{path: {root / 'images'}}}\n")
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
        for k in (
            "GPUS_PER_NODE",
            "PROCS_PER_NODE",
            "CUDA_VISIBLE_DEVICES",
            "MAIN_ADDR",
            "MAIN_PORT",
            "DRY_RUN",
            "ACCELERATE_CONFIG",
            "SETUP",
            "REQUEUE",
            "DDPF_SLURM_DIR",
        ):
            base.pop(k, None)
        base.update(
            PATH=f"{bin_dir}:{os.environ['PATH']}",
            PYTHON=sys.executable,
            PYTHONPATH=str(REPO),
            FAKE_SLURM_LOG=str(self.log),
        )
        self.outside = dict(base)
        self.env = dict(base)
        # what a batch shell sees on the first node of a 3-node job with 4 GPUs per node
        self.allocate(["gpu01", "gpu02", "gpu03"], job_id=4242, SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="8")

    def allocate(self, hosts, job_id, **env):
        self.env.update(
            FAKE_HOSTS=" ".join(hosts),
            SLURM_JOB_ID=str(job_id),
            SLURM_JOB_NUM_NODES=str(len(hosts)),
            SLURM_NNODES=str(len(hosts)),
            SLURM_JOB_NODELIST=",".join(hosts),
            SLURM_NODEID="0",
            SLURMD_NODENAME=hosts[0],
            SLURM_SUBMIT_DIR=str(REPO),
            SLURM_RESTART_COUNT="0",
            **env,
        )

    def cmd(self, template, *args):
        return ["bash", str(REPO / "slurm" / template), *[str(a) for a in args]]

    def run(self, template, *args, inside=True, **env):
        full_env = dict(self.env if inside else self.outside, **env)
        return subprocess.run(
            self.cmd(template, *args), cwd=REPO, env=full_env, capture_output=True, text=True, timeout=120
        )

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()


@pytest.fixture
def fake(tmp_path):
    return FakeSlurm(tmp_path)


def node_lines(stdout: str) -> dict[str, list[str]]:
    """{node name: launch argv} from a DRY_RUN's `node NAME (SLURM_NODEID=i): CMD` lines."""
    found = {}
    for line in stdout.splitlines():
        m = re.match(r"node (\S+) \(SLURM_NODEID=(\d+)\): (.*)$", line)
        if m:
            found[m.group(1)] = m.group(3).split()
    return found


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_multi_node_launch_line_for_a_three_node_allocation(fake):
    result = fake.run("multi_node.sbatch", fake.config, "train.epochs=3", DRY_RUN="1", FAKE_MAIN_NODEADDR="10.9.0.1")
    assert result.returncode == 0, result.stderr
    nodes = node_lines(result.stdout)
    assert list(nodes) == ["gpu01", "gpu02", "gpu03"], result.stdout
    for rank, (_host, argv) in enumerate(nodes.items()):
        # the node rank is expanded on each node (the fake srun gives every task its own
        # SLURM_NODEID; the batch shell's is 0, so an early expansion would give 0 everywhere)
        assert flag(argv, "--machine_rank") == str(rank)
        assert flag(argv, "--num_machines") == "3"
        assert flag(argv, "--num_processes") == "12"  # accelerate counts all nodes: 3 x 4 GPUs
        assert flag(argv, "--main_process_ip") == "10.9.0.1"  # NodeAddr of the first node
        assert flag(argv, "--main_process_port") == str(20000 + 4242 % 12000)
        assert "--multi_gpu" in argv
        assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]  # the checked python's accelerate
        train = argv[argv.index("ddp_finetune") - 1 :]
        assert train == ["-m", "ddp_finetune", "train", str(fake.config), "train.epochs=3", "checkpoint.resume=auto"]
    srun = [c for c in fake.calls() if c.startswith("srun ")]
    assert len(srun) == 1
    for option in ("--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=8"):
        assert option in srun[0].split()


def test_port_follows_the_job_id_and_address_falls_back_to_the_host_name(fake):
    ports = set()
    for job_id in (4242, 4243):
        fake.allocate(["gpu07", "gpu08"], job_id=job_id)
        result = fake.run("multi_node.sbatch", fake.config, DRY_RUN="1")
        assert result.returncode == 0, result.stderr
        argv = node_lines(result.stdout)["gpu08"]
        assert flag(argv, "--main_process_ip") == "gpu07"  # no NodeAddr known: the host name
        ports.add(flag(argv, "--main_process_port"))
    assert len(ports) == 2, "two jobs sharing a node must not share a port"


def test_cpu_template_runs_procs_per_node_ranks_on_each_node(fake):
    fake.allocate(["n1", "n2"], job_id=7, SLURM_CPUS_PER_TASK="4")
    result = fake.run("cpu.sbatch", fake.config, DRY_RUN="1", PROCS_PER_NODE="2", MAIN_PORT="29999")
    assert result.returncode == 0, result.stderr
    nodes = node_lines(result.stdout)
    assert [flag(a, "--machine_rank") for a in nodes.values()] == ["0", "1"]
    assert {flag(a, "--num_processes") for a in nodes.values()} == {"4"}
    assert {flag(a, "--main_process_port") for a in nodes.values()} == {"29999"}


def test_a_single_process_runs_python_itself(fake):
    """accelerate refuses --multi_gpu for 1 process, and its 1-process launcher dies on SIGTERM
    leaving the training orphaned: 1 node x 1 rank runs the training command directly."""
    fake.allocate(["n1"], job_id=8, SLURM_CPUS_PER_TASK="1")
    result = fake.run("cpu.sbatch", fake.config, DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    assert node_lines(result.stdout)["n1"] == [
        sys.executable,
        "-m",
        "ddp_finetune",
        "train",
        str(fake.config),
        "checkpoint.resume=auto",
    ]


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX + "error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_outside_slurm_says_how_to_submit(fake, template):
    result = fake.run(template, fake.config, inside=False)
    assert_one_line_error(result, "not inside a SLURM job", f"sbatch slurm/{template}")
    assert fake.calls() == []


def test_config_missing_on_the_node(fake):
    result = fake.run("multi_node.sbatch", fake.root / "nope.yaml")
    assert_one_line_error(result, "nope.yaml", "does not exist on node gpu01")
    assert fake.calls() == [], "nothing is launched"


def test_invalid_config_is_reported_before_launching(fake):
    result = fake.run("multi_node.sbatch", fake.config, "train.epochz=3")
    assert_one_line_error(result, "unknown config key 'train.epochz'")
    assert fake.calls() == []


def test_no_config_given(fake):
    assert_one_line_error(fake.run("cpu.sbatch"), "no config given", "sbatch slurm/cpu.sbatch CONFIG.yaml")


@pytest.mark.parametrize("template", ["single_node.sbatch", "multi_node.sbatch"])
def test_gpu_count_must_match_the_allocation(fake, template):
    fake.allocate(["gpu01"], job_id=11, SLURM_GPUS_ON_NODE="4")
    assert_one_line_error(fake.run(template, fake.config, GPUS_PER_NODE="8"), "GPUS_PER_NODE=8", "allocated 4 GPU(s)")
    del fake.env["SLURM_GPUS_ON_NODE"]
    assert_one_line_error(fake.run(template, fake.config), "no GPUs in this allocation")
    assert fake.calls() == []


def test_single_node_template_refuses_several_nodes(fake):
    assert_one_line_error(fake.run("single_node.sbatch", fake.config), "got 3 nodes", "multi_node.sbatch")


def test_cpu_template_refuses_more_ranks_than_cpus(fake):
    fake.allocate(["n1"], job_id=12, SLURM_CPUS_PER_TASK="2")
    assert_one_line_error(
        fake.run("cpu.sbatch", fake.config, PROCS_PER_NODE="3"), "PROCS_PER_NODE=3", "--cpus-per-task=3"
    )


@pytest.mark.parametrize(
    "outcome, requeue, status",
    [("done", "1", 0), ("fail", "1", 1), ("preempt", "1", EXIT_PREEMPTED), ("preempt", "0", EXIT_PREEMPTED)],
)
def test_exit_status_and_requeue_follow_the_outcome(fake, outcome, requeue, status):
    fake.allocate(["n1"], job_id=31, SLURM_CPUS_PER_TASK="2")
    result = fake.run("cpu.sbatch", fake.config, FAKE_SRUN=outcome, REQUEUE=requeue)
    assert result.returncode == status, result.stdout + result.stderr
    requeued = [c for c in fake.calls() if c.startswith("requeue")]
    assert requeued == (["requeue 31"] if outcome == "preempt" and requeue == "1" else [])
    assert not (fake.out / STOP_FILE).exists()


def test_warning_signal_to_the_batch_shell_becomes_the_stop_file(fake):
    """`--signal=B:USR1@120` signals only the batch shell: it must write the stop file and wait."""
    fake.allocate(["n1"], job_id=32, SLURM_CPUS_PER_TASK="2")
    proc = subprocess.Popen(
        fake.cmd("cpu.sbatch", fake.config),
        cwd=REPO,
        env=dict(fake.env, FAKE_SRUN="wait_stop"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(c.startswith("srun") for c in fake.calls()):
            assert time.monotonic() < deadline and proc.poll() is None, "the template never started srun"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, out
    assert "batch shell got SIGUSR1" in out
    assert [c for c in fake.calls() if c.startswith("requeue")] == ["requeue 32"]
    assert not (fake.out / STOP_FILE).exists(), "the template removes the stop file after the run"


# ============================================================================ real SLURM
def _start_cluster() -> tuple[bool, str | None]:
    """(started here, reason to skip or None)."""
    if os.geteuid() != 0:
        return False, "starting the local SLURM cluster needs root (daemons, /etc/slurm)"
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        return False, "SLURM is not installed and apt-get is not available to install it"
    was_up = (
        shutil.which("scontrol")
        and subprocess.run(["bash", str(START_SCRIPT), "status"], capture_output=True).returncode == 0
    )
    try:
        proc = subprocess.run(
            ["bash", str(START_SCRIPT)],
            env=dict(os.environ, FAKE_NODES="2"),
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        return False, "slurm/local/start-local-slurm.sh did not finish within 600 s"
    if proc.returncode != 0:
        last = (
            [line for line in proc.stderr.splitlines() if "error" in line.lower()]
            or proc.stderr.splitlines()
            or ["no output"]
        )
        return False, f"slurm/local/start-local-slurm.sh failed: {last[-1]}"
    return not was_up, None


@pytest.fixture(scope="session")
def slurm_cluster():
    started, reason = _start_cluster()
    if reason:
        print(f"\nSLURM tests skipped: {reason}", file=sys.__stderr__, flush=True)
        pytest.skip(reason)
    yield
    if started:
        subprocess.run(["bash", str(START_SCRIPT), "stop"], capture_output=True, timeout=180)


def job_info(job_id: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_job(job: dict, timeout: float = 360) -> dict:
    deadline = job["submitted"] + timeout
    while time.monotonic() < deadline:
        info = job_info(job["id"])
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job["id"]])
    raise AssertionError(f"job {job['id']} did not end within {timeout} s; log:\n{job_log(job)}")


def job_log(job: dict) -> str:
    return job["log"].read_text()[-4000:] if job["log"].exists() else "(no log)"


def sbatch(root: Path, name: str, config: Path, nodes: int, procs: int, overrides=()) -> dict:
    out, log = root / name, root / f"{name}.log"
    cmd = [
        "sbatch",
        "--parsable",
        f"--job-name={name}",
        f"--chdir={REPO}",
        f"--output={log}",
        f"--nodes={nodes}",
        f"--cpus-per-task={procs}",
        f"--export=ALL,PROCS_PER_NODE={procs}",
        str(REPO / "slurm" / "cpu.sbatch"),
        str(config),
        f"output_dir={out}",
        *overrides,
    ]
    proc = subprocess.run(cmd, env=child_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return {"id": proc.stdout.strip().split(";")[0], "out": out, "log": log, "submitted": time.monotonic()}


@pytest.fixture(scope="module")
def slurm_runs(slurm_cluster, tmp_path_factory):
    """Submit the three jobs at once (the preempted one first: it waits ~20 s in the queue when
    requeued), signal that one while its loss holds it inside step GATE_STEP, and compute the
    1-process reference."""
    base = tmp_path_factory.getbasetemp()
    setup_root = base / "preempt_setup"  # shared with tests/test_preemption.py
    config = make_setup(setup_root)
    root = base / "slurm_jobs"
    root.mkdir()
    gate_dir = root / "gate"
    jobs = {
        "preempted": sbatch(root, "preempted", config, nodes=2, procs=1, overrides=gate(gate_dir)),
        "two_nodes": sbatch(root, "two_nodes", config, nodes=2, procs=1),
        "one_node": sbatch(root, "one_node", config, nodes=1, procs=2),
    }
    try:
        p = jobs["preempted"]
        try:
            for rank in (0, 1):
                wait_for_file(gate_dir / f"reached.{rank}", timeout=240, what=f"job {p['id']}")
            # --full: the batch shell, srun and every process of the step, torchrun included,
            # get USR1 at once; none may die of it, and the ranks must stop at a step boundary
            subprocess.run(["scancel", "--full", "--signal=USR1", p["id"]], check=True)
            # the batch shell's trap turns the signal into the stop file; only then may the ranks go on
            wait_for_file(p["out"] / STOP_FILE, timeout=60, what=f"job {p['id']}'s batch shell")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log:\n{job_log(p)}") from None
        (gate_dir / "go").touch()
        jobs["reference"] = reference_run(setup_root)
        yield jobs
    finally:
        for job in jobs.values():
            if isinstance(job, dict) and job_info(job["id"]).get("JobState") not in TERMINAL:
                subprocess.run(["scancel", job["id"]])


def check_finished(job: dict, reference: Path) -> dict:
    info = wait_job(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job_log(job)
    summary = json.loads((job["out"] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == TOTAL_STEPS
    diff = max_weight_diff(job["out"] / "final" / "model.safetensors", reference)
    assert diff <= 1e-5, f"job {job['id']}: weights differ from the 1-process run by {diff}"
    return info


@pytest.mark.slurm
def test_one_node_two_ranks_match_one_process(slurm_runs):
    job = slurm_runs["one_node"]
    check_finished(job, slurm_runs["reference"])
    assert "world size 2 (node rank 0 of 1" in job["log"].read_text()


@pytest.mark.slurm
def test_two_nodes_one_rank_each_match_one_process(slurm_runs):
    job = slurm_runs["two_nodes"]
    check_finished(job, slurm_runs["reference"])
    assert "world size 2 (node rank 0 of 2" in job["log"].read_text()


@pytest.mark.slurm
def test_signalled_job_checkpoints_requeues_and_resumes(slurm_runs):
    job = slurm_runs["preempted"]
    info = check_finished(job, slurm_runs["reference"])
    log = job["log"].read_text()
    assert info["Restarts"] == "1", log[-4000:]  # same job id, run twice
    m = re.search(r'preempted: \{"step": (\d+)', log)
    assert m, log[-4000:]
    step = int(m.group(1))
    assert GATE_STEP <= step < TOTAL_STEPS
    assert f"job {job['id']} (restart 1)" in log, "one log file across the requeue (--open-mode=append)"
    assert f"resumed from {job['out'] / 'checkpoints' / f'step_{step}'}" in log
    summary = json.loads((job["out"] / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step_{step}")
    assert not (job["out"] / PREEMPTED_FILE).exists() and not (job["out"] / STOP_FILE).exists()
