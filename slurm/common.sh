# slurm/common.sh: what the batch templates share. Sourced by slurm/*.sbatch, not run.
#
# A template calls require_slurm, sets PROCS_PER_NODE with check_gpus or check_cpus (which
# compare it with the allocation), then `run_job TEMPLATE CONFIG [key=value ...]`, which:
#   1. checks the input (inside SLURM, config readable on this node, config valid) and resolves
#      output_dir through ddp_finetune's own config loader;
#   2. starts ONE `srun` task per node; each task runs `node_main`, which builds the
#      `accelerate launch` line with --machine_rank "$SLURM_NODEID" read on that node;
#   3. turns a warning signal (batch shell or job step) into the stop file <output_dir>/.stop,
#      which every rank polls (ddp_finetune/training/preemption.py explains why not a signal);
#   4. after the launch ends, says what happened and exits with a status that tells it:
#        0   done: the training finished (summary.json written)
#        75  preempted: checkpoint + preempted.json written, job requeued (EXIT_PREEMPTED)
#        2   bad input (this file's checks; nothing was launched)
#        other non-zero: the training failed; not requeued
#
# Environment (all optional):
#   ACCELERATE_CONFIG  an accelerate config file, passed as --config_file (not used for 1 process)
#   MAIN_PORT          rendezvous port (default 20000 + job id % 12000: two jobs on a node differ)
#   MAIN_ADDR          rendezvous address (default: the NodeAddr of the job's first node)
#   SETUP              shell code run first in the batch shell, e.g. "module load cuda; source venv/bin/activate"
#   PYTHON             python of the environment (default: python)
#   DRY_RUN=1          check everything and print each node's launch line; train nothing
#   REQUEUE=0          on preemption, checkpoint and exit 75 but do not requeue

EXIT_PREEMPTED=75 # = ddp_finetune.training.preemption.EXIT_PREEMPTED
EXIT_BAD_INPUT=2

say() { echo "ddp-finetune slurm: $*"; }
die() {
    echo "ddp-finetune slurm: error: $*" >&2 # one line in the job log
    exit "$EXIT_BAD_INPUT"
}

# ------------------------------------------------------------------ checks
require_slurm() {
    [[ -n ${SLURM_JOB_ID:-} ]] ||
        die "not inside a SLURM job (SLURM_JOB_ID is unset); submit it: sbatch $1 CONFIG.yaml [key=value ...]"
}

# gpus_on_node: GPUs SLURM gave this node (0 when none)
gpus_on_node() {
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .
    else
        echo 0
    fi
}

# check_gpus: PROCS_PER_NODE = the node's GPUs; GPUS_PER_NODE, when set, must agree with them
check_gpus() {
    local have
    have=$(gpus_on_node)
    ((have > 0)) || die "no GPUs in this allocation; ask for them (sbatch --gpus-per-node=G ...) or use slurm/cpu.sbatch on CPU nodes"
    if [[ -n ${GPUS_PER_NODE:-} ]] && [[ $GPUS_PER_NODE != "$have" ]]; then
        die "GPUS_PER_NODE=$GPUS_PER_NODE but SLURM allocated $have GPU(s) per node; ask for --gpus-per-node=$GPUS_PER_NODE or set GPUS_PER_NODE=$have"
    fi
    PROCS_PER_NODE=$have
}

# check_cpus: PROCS_PER_NODE gloo ranks (default 1), each with at least one allocated CPU
check_cpus() {
    local cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
    PROCS_PER_NODE=${PROCS_PER_NODE:-1}
    [[ $PROCS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "PROCS_PER_NODE=$PROCS_PER_NODE is not a positive integer"
    ((PROCS_PER_NODE <= cpus)) ||
        die "PROCS_PER_NODE=$PROCS_PER_NODE but only $cpus CPU(s) per node are allocated; ask for --cpus-per-task=$PROCS_PER_NODE"
    # share the node's cores between the ranks instead of each rank using all of them
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / PROCS_PER_NODE))}
}

# resolve_output_dir CONFIG [overrides]: validate the config with ddp_finetune itself and
# print output_dir as an absolute path (the stop file and preempted.json live there)
resolve_output_dir() {
    "$PYTHON" - "$@" 2>&1 <<'EOF'
import os, sys
try:
    from ddp_finetune.config import load_config
    from ddp_finetune.errors import UserError
except ImportError as exc:
    sys.exit(f"cannot import ddp_finetune with {sys.executable} ({exc}); install it or activate its environment (SETUP=...)")
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except UserError as exc:
    sys.exit(str(exc))
print(os.path.abspath(cfg.output_dir))
EOF
}

# ------------------------------------------------------------------ launch line
# launch_line NODE_RANK: the accelerate command of one node, into the array LAUNCH.
# Reads TRAIN_ARGS (config + overrides) and the NUM_NODES/PROCS_PER_NODE/MAIN_* exports.
launch_line() {
    if ((NUM_NODES * PROCS_PER_NODE == 1)); then
        # one process: accelerate refuses --multi_gpu, and its single-process launcher dies on
        # SIGTERM leaving the training orphaned; python itself keeps the exit status too
        LAUNCH=("$PYTHON" -m ddp_finetune train "${TRAIN_ARGS[@]}")
        return
    fi
    # `accelerate launch` of the same python that checked the config
    LAUNCH=("$PYTHON" -m accelerate.commands.launch)
    [[ -n ${ACCELERATE_CONFIG:-} ]] && LAUNCH+=(--config_file "$ACCELERATE_CONFIG")
    # --multi_gpu also for CPU: it is what makes accelerate start N gloo ranks (docs/pitfalls.md, 2)
    LAUNCH+=(--multi_gpu --num_processes "$((NUM_NODES * PROCS_PER_NODE))"
        --num_machines "$NUM_NODES" --machine_rank "$1"
        --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT"
        --mixed_precision no --dynamo_backend no # train.mixed_precision in the config decides
        -m ddp_finetune train "${TRAIN_ARGS[@]}")
}

# ------------------------------------------------------------------ signals
# A warning signal becomes the stop file: the ranks checkpoint at their next step boundary.
# A signal that arrives before output_dir is known is remembered and written later.
request_stop() {
    say "$WHERE got SIG$1 at $(date +%T): asking every rank to checkpoint and stop (${STOP_FILE:-stop file})"
    STOP_REQUESTED=1
    [[ -n ${STOP_FILE:-} ]] && touch "$STOP_FILE"
}

trap_stop_signals() {
    local sig
    for sig in USR1 USR2 TERM; do
        # shellcheck disable=SC2064
        trap "request_stop $sig" "$sig"
    done
}

# wait_for PID: wait until PID ends, also across traps (a trap interrupts `wait`); sets RC
wait_for() {
    local rc
    while :; do
        wait "$1"
        RC=$?
        kill -0 "$1" 2>/dev/null || break
    done
    # a trap may have interrupted the last wait just before the process ended
    if ((RC > 128)); then
        wait "$1" 2>/dev/null
        rc=$?
        ((rc != 127)) && RC=$rc
    fi
    return 0
}

# node_main: one per node, run by srun. The node rank is read HERE, on the node.
node_main() {
    TRAIN_ARGS=("$@")
    launch_line "$SLURM_NODEID"
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        echo "node ${SLURMD_NODENAME:-$(hostname)} (SLURM_NODEID=$SLURM_NODEID): $(printf '%q ' "${LAUNCH[@]}")"
        return 0
    fi
    WHERE="node ${SLURMD_NODENAME:-$(hostname)}"
    # `scancel --signal=USR1 JOBID` (no --batch) signals every process of the step. The
    # launcher must survive USR1/USR2 (torchrun dies on them, orphaning the ranks), so it runs
    # with them ignored; the ranks install their own handlers, and this shell writes the file.
    trap_stop_signals
    (
        trap '' USR1 USR2
        exec "${LAUNCH[@]}"
    ) &
    wait_for $!
    return "$RC"
}

# ------------------------------------------------------------------ the job
run_job() {
    local template=$1 config=${2:-}
    shift 2 2>/dev/null || shift $#
    WHERE="batch shell"
    trap_stop_signals
    if [[ -n ${SETUP:-} ]]; then eval "$SETUP" || die "SETUP failed: $SETUP"; fi
    [[ -n $config ]] || die "no config given; usage: sbatch $template CONFIG.yaml [key=value ...]"
    if [[ $config == *.json && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
        # a task of `ddp-finetune sweep --slurm`'s job array: the argument is the sweep's manifest,
        # and the task's element in it gives the config and overrides (one per line); a bad
        # manifest or index is one error line from ddp-finetune itself
        local element
        element=$("$PYTHON" -m ddp_finetune sweep-element "$config" "$SLURM_ARRAY_TASK_ID") || exit "$EXIT_BAD_INPUT"
        mapfile -t ELEMENT <<<"$element"
        say "sweep element $SLURM_ARRAY_TASK_ID of $config"
        config=${ELEMENT[0]}
        set -- "${ELEMENT[@]:1}" "$@"
    fi
    [[ -f $config && -r $config ]] ||
        die "config file '$config' does not exist on node ${SLURMD_NODENAME:-$(hostname)} (cwd $PWD); give a path on the shared filesystem"
    # resume is always automatic: a requeued job continues from its newest checkpoint
    TRAIN_ARGS=("$config" "$@" checkpoint.resume=auto)

    local out
    out=$(resolve_output_dir "${TRAIN_ARGS[@]}") || die "$(tail -n 1 <<<"$out")"
    OUTPUT_DIR=$(tail -n 1 <<<"$out") # the path is the last line, after any warnings
    STOP_FILE=$OUTPUT_DIR/.stop

    NUM_NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    local first_host node_addr
    first_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    [[ -n $first_host ]] || die "cannot list the nodes of SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}' with scontrol"
    # the address SLURM itself uses for the node; usually the host name
    node_addr=$(scontrol show node "$first_host" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    MAIN_ADDR=${MAIN_ADDR:-${node_addr:-$first_host}}
    MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 12000))}
    export NUM_NODES PROCS_PER_NODE MAIN_ADDR MAIN_PORT STOP_FILE PYTHON DRY_RUN

    say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $NUM_NODES node(s) x $PROCS_PER_NODE process(es), main $MAIN_ADDR:$MAIN_PORT, output $OUTPUT_DIR"
    # one task per node with all the node's CPUs; a task that fails ends the others (no hang)
    local step=(srun --nodes="$NUM_NODES" --ntasks="$NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK") # srun 22.05 no longer inherits it
    step+=(bash -c 'source "$0" && node_main "$@"' "$COMMON_SH" "${TRAIN_ARGS[@]}")
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        say "dry run, nothing is trained; the step: $(printf '%q ' "${step[@]}")"
        "${step[@]}"
        return 0
    fi

    mkdir -p "$OUTPUT_DIR"
    rm -f "$STOP_FILE" "$OUTPUT_DIR/preempted.json" # leftovers of an earlier run
    ((STOP_REQUESTED)) && touch "$STOP_FILE"
    (
        trap '' USR1 USR2 # srun must not die on them; this shell's trap answers them
        exec "${step[@]}"
    ) &
    wait_for $!
    trap - USR1 USR2 TERM
    rm -f "$STOP_FILE"

    if [[ -f $OUTPUT_DIR/preempted.json ]]; then
        say "preempted: $(tr -d '\n' <"$OUTPUT_DIR/preempted.json")"
        if [[ ${REQUEUE:-1} == 1 ]]; then
            say "requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint"
            scontrol requeue "$SLURM_JOB_ID" || say "requeue refused (cancelled job?); resubmit the same command to resume"
        fi
        exit "$EXIT_PREEMPTED"
    elif ((RC == 0)); then
        say "done: $OUTPUT_DIR/summary.json"
        exit 0
    fi
    say "failed with exit status $RC (see the errors above); not requeued"
    exit "$RC"
}

PYTHON=${PYTHON:-python}
STOP_REQUESTED=0
WHERE="batch shell"
COMMON_SH=$(realpath "${BASH_SOURCE[0]}")
