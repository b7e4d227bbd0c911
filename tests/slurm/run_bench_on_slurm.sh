#!/usr/bin/env bash
# Runs the scenario bench on Slurm on this machine and checks it against an unsharded run:
#   1. a single-node Slurm cluster from Debian's packages (slurmctld, slurmd, slurm-client,
#      munge), its daemons started by hand (no systemd needed), their PIDs kept in $PID_FILE;
#   2. a virtual environment for the project, outside the repository;
#   3. bench_array.sbatch as a job array, bench_merge.sbatch after it (afterok);
#   4. waits for both, prints each task's final state (from Slurm's job completion log: no
#      accounting database needed), runs the unsharded bench with the same flags and compares
#      the two monitoring_export/bench.csv byte for byte: PASS or FAIL;
#   5. stops the daemons it started.
# Not a pytest test: it needs root, installs system packages and starts daemons.
#
# Usage, as root:
#   tests/slurm/run_bench_on_slurm.sh [WORK_DIR] [-- BENCH_FLAGS...]
#   tests/slurm/run_bench_on_slurm.sh --stop    # stop the daemons a KEEP_SLURM=1 run left
# WORK_DIR, outside the repository (default: a new temporary folder), keeps venv/ from run to run
# and one runs/DATE-TIME/ per run: the jobs' logs, bench/ (shards and merge), unsharded/.
# BENCH_FLAGS go to every shard, the merge and the unsharded run; the default is a tiny bench.
# Environment:
#   VENV=DIR          use this virtual environment (requirements.txt installed) instead of
#                     WORK_DIR/venv
#   BENCH_ARRAY=SPEC  replace the array's --array, e.g. 0-9%1 (at most one task at a time)
#   KEEP_SLURM=1      leave the daemons running at the end (a later run reuses them)
#   WAIT_TIMEOUT=S    cancel the jobs and fail after S seconds (default 1800)
# Exit status: 0 PASS, 1 FAIL, 2 usage or set-up error (or the status of a set-up command that failed).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
SLURM_CONF=/etc/slurm/slurm.conf
CONF_MARK="# Written by tests/slurm/run_bench_on_slurm.sh (self-healing bench); rewritten by it."
JOBCOMP_LOG=/var/log/slurm/jobcomp.log
STATE_DIR=/run/self-healing-slurm        # daemons.pid and the daemons' own output
PID_FILE=$STATE_DIR/daemons.pid          # one "NAME PID" line per daemon this script started
TINY_BENCH=(--seeds 2 --n-train 600 --n-test 200 --n-drift 200 --epochs 2 --n-batches 6
            --batch-size 50 --no-plots)
WAIT_TIMEOUT=${WAIT_TIMEOUT:-1800}
NODE=$(hostname -s)

say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { printf 'run_bench_on_slurm.sh: error: %s\n' "$*" >&2; exit 2; }
inside_repo() { [[ $(realpath -m "$1")/ == "$REPO"/* ]]; }

# --- daemons: started by hand, stopped by the PID recorded when this script started them ------

recorded_pid() { if [[ -r $PID_FILE ]]; then awk -v n="$1" '$1 == n { print $2 }' "$PID_FILE"; fi; }

forget_pid() {
    [[ -e $PID_FILE ]] || return 0
    awk -v n="$1" '$1 != n' "$PID_FILE" > "$PID_FILE.new" && mv "$PID_FILE.new" "$PID_FILE"
}

# True when PID is a live process called NAME (a zombie has ended: it only waits to be reaped).
is_running() {
    local pid=$1 name=$2 stat
    [[ $pid =~ ^[0-9]+$ ]] && stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" && ${stat##*) } != Z* ]]
}

# start_daemon NAME PIDFILE COMMAND...: start COMMAND (which must stay in the foreground and be
# called NAME) unless NAME already runs, ours (recorded) or not (its own PIDFILE: left alone).
start_daemon() {
    local name=$1 pidfile=$2 pid
    shift 2
    pid=$(recorded_pid "$name")
    if [[ -n $pid ]] && is_running "$pid" "$name"; then
        say "$name: already running, PID $pid (started by this script earlier)"
        return
    fi
    forget_pid "$name"
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [[ -n $pid ]] && is_running "$pid" "$name"; then
        say "$name: already running, PID $pid (not started by this script: it will not stop it)"
        return
    fi
    # setsid: its own session, so that a Ctrl-C in this terminal does not reach it; setsid
    # execs in place here (a background job of a script is no group leader), so $! is the daemon.
    setsid "$@" < /dev/null > "$STATE_DIR/$name.out" 2>&1 &
    pid=$!
    echo "$name $pid" >> "$PID_FILE"
    sleep 1
    is_running "$pid" "$name" || { cat "$STATE_DIR/$name.out" >&2; die "$name did not start"; }
    say "$name: started, PID $pid (output: $STATE_DIR/$name.out)"
}

stop_daemons() {
    local name pid i
    for name in slurmd slurmctld munged; do
        pid=$(recorded_pid "$name")
        [[ -n $pid ]] || continue
        if is_running "$pid" "$name"; then
            kill -TERM "$pid"
            for ((i = 0; i < 150; i++)); do is_running "$pid" "$name" || break; sleep 0.1; done
            is_running "$pid" "$name" && kill -KILL "$pid"
            wait "$pid" 2> /dev/null || true     # reap it, when this shell started it
            say "$name: stopped PID $pid"
        fi
        forget_pid "$name"
    done
    [[ -s $PID_FILE ]] || rm -f "$PID_FILE"
}

# --- 1. a single-node cluster ------------------------------------------------------------------

install_packages() {
    local missing=() p
    for p in slurmctld slurmd slurm-client munge; do
        dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
    say "packages: $(dpkg-query -W -f='${Package} ${Version}  ' slurmctld slurmd slurm-client munge)"
}

# Prints the configuration for this machine: all of it derived from the machine, so a rerun on
# the same machine writes the same file.
slurm_conf() {
    local cpus mem margin
    cpus=$(nproc)
    mem=$(($(awk '/^MemTotal:/ { print $2 }' /proc/meminfo) / 1024))
    # RealMemory above what slurmd measures drains the node ("Low RealMemory"): keep 5% back,
    # at least 512 MiB.
    margin=$((mem / 20 > 512 ? mem / 20 : 512))
    cat << EOF
$CONF_MARK
# A single-node cluster for testing, its daemons started by hand in a container: no cgroups
# (proctrack/linuxproc, task/none), no accounting database (the job completion log instead).
ClusterName=selfhealing
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP_LOG
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# a DOWN node becomes usable again as soon as its slurmd registers with a valid configuration
ReturnToService=2
# the node is what this file says, even where a container shows other sockets/cores than nproc
SlurmdParameters=config_overrides
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$((mem - margin)) State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

write_slurm_conf() {
    local conf
    conf=$(slurm_conf)
    if [[ -e $SLURM_CONF ]] && ! grep -qxF "$CONF_MARK" "$SLURM_CONF"; then
        die "$SLURM_CONF exists and this script did not write it: not replacing it (move it away to go on)"
    fi
    if [[ -e $SLURM_CONF && $(< "$SLURM_CONF") == "$conf" ]]; then
        say "$SLURM_CONF: up to date"
        return
    fi
    local name pid
    for name in slurmd slurmctld; do      # ours run with the old file: restart them
        pid=$(recorded_pid "$name")
        if [[ -n $pid ]] && is_running "$pid" "$name"; then
            say "$SLURM_CONF changes: stopping $name (PID $pid) to restart it"
            kill -TERM "$pid"
            while is_running "$pid" "$name"; do sleep 0.2; done
            forget_pid "$name"
        fi
    done
    printf '%s\n' "$conf" > "$SLURM_CONF"
    say "$SLURM_CONF: written"
    grep -E '^(NodeName|PartitionName)=' "$SLURM_CONF" | sed 's/^/    /'
}

start_cluster() {
    mkdir -p "$STATE_DIR"
    # munge: the key is made once (Debian's package usually has); munged runs as user munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        say "/etc/munge/munge.key: created"
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld /var/log/slurm
    install -d -o root -g root -m 0755 /var/spool/slurmd
    write_slurm_conf
    start_daemon munged /run/munge/munged.pid \
        setpriv --reuid=munge --regid=munge --init-groups -- /usr/sbin/munged --foreground
    munge -n | unmunge > /dev/null || die "munge does not work: see $STATE_DIR/munged.out"
    start_daemon slurmctld /run/slurmctld.pid /usr/sbin/slurmctld -D
    start_daemon slurmd /run/slurmd.pid /usr/sbin/slurmd -D
    wait_for_node
}

wait_for_node() {
    local state="" i
    for ((i = 0; i < 90; i++)); do
        state=$(sinfo -h -N -n "$NODE" -o '%T' 2> /dev/null || true)
        case $state in
            idle) say "node $NODE: idle"; return ;;
            mixed | allocated | completing) say "node $NODE: $state (jobs of earlier runs)"; return ;;
            down* | drain*)
                if ((i == 15)); then    # ReturnToService=2 has not brought it back: say why, resume it
                    say "node $NODE: $state, reason: $(sinfo -h -N -n "$NODE" -o '%E')"
                    scontrol update NodeName="$NODE" State=RESUME || true
                fi ;;
        esac
        sleep 1
    done
    sinfo -R >&2 || true
    die "node $NODE is not idle after 90 s (state: ${state:-unknown}); see /var/log/slurm/slurmd.log"
}

# --- 2. the virtual environment ----------------------------------------------------------------

make_venv() {
    if [[ -n ${VENV:-} ]]; then
        [[ -x $VENV/bin/python ]] || die "VENV=$VENV has no bin/python"
        say "venv: $VENV (given)"
        return
    fi
    VENV=$WORK_DIR/venv
    # rebuilt only when requirements.txt changed since it was made
    if ! cmp -s "$REPO/requirements.txt" "$VENV/requirements.txt.installed"; then
        say "venv: making $VENV (pip install -r requirements.txt)"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REPO/requirements.txt"
        cp "$REPO/requirements.txt" "$VENV/requirements.txt.installed"
    fi
    say "venv: $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
}

# --- 3 and 4. the jobs -------------------------------------------------------------------------

# job_record ID [TASK]: "STATE EXIT JOBID START END REQUEUES" from the last completion record of
# plain job ID, or of task TASK of array job ID; nothing when there is none. A requeue leaves a
# PENDING record, counted.
job_record() {
    awk -v id="$1" -v task="${2:-}" '
        { delete f; for (i = 1; i <= NF; i++) { k = $i; sub(/=.*/, "", k); f[k] = substr($i, length(k) + 2) } }
        (task == "" && f["JobId"] == id && f["ArrayJobId"] == "") ||
        (task != "" && f["ArrayJobId"] == id && f["ArrayTaskId"] == task) {
            if (f["JobState"] == "PENDING") requeues++
            else last = f["JobState"] " " f["ExitCode"] " " f["JobId"] " " f["StartTime"] " " f["EndTime"]
        }
        END { if (last != "") print last, requeues + 0 }' "$RUN_DIR/jobcomp.log"
}

# describe LABEL ID [TASK]: one line for a finished job; false unless it COMPLETED with exit 0.
describe() {
    local label=$1 state exit jobid start end requeues
    read -r state exit jobid start end requeues <<< "$(job_record "$2" "${3:-}")" || true
    if [[ -z ${state:-} ]]; then
        printf '    %-9s no completion record\n' "$label"
        return 1
    fi
    local took=""
    [[ $start == 20* && $end == 20* ]] && took="$(($(date -d "$end" +%s) - $(date -d "$start" +%s))) s"
    printf '    %-9s %-10s exit %-5s job %-6s %6s%s\n' "$label" "$state" "$exit" "$jobid" "$took" \
        "$( ((requeues)) && echo ", requeued $requeues time(s)")"
    [[ $state == COMPLETED && $exit == 0:0 ]]
}

show_log_tail() {   # the last lines of a job's log, indented
    [[ -s $1 ]] || return 0
    echo "      ${1##*/}:"
    tail -n "${2:-5}" "$1" | sed 's/^/        /'
}

run_jobs() {
    local jobcomp_from array_opt=()
    jobcomp_from=$(($(stat -c %s "$JOBCOMP_LOG" 2> /dev/null || echo 0) + 1))
    [[ -n ${BENCH_ARRAY:-} ]] && array_opt=(--array="$BENCH_ARRAY")
    export REPO VENV BENCH_OUT=$RUN_DIR/bench    # sbatch passes them on to the jobs
    ARRAY_ID=$(sbatch --parsable --chdir="$RUN_DIR" "${array_opt[@]}" \
        "$REPO/tests/slurm/bench_array.sbatch" "${FLAGS[@]}")
    ARRAY_ID=${ARRAY_ID%%;*}
    MERGE_ID=$(sbatch --parsable --chdir="$RUN_DIR" --dependency=afterok:"$ARRAY_ID" \
        "$REPO/tests/slurm/bench_merge.sbatch" "${FLAGS[@]}")
    MERGE_ID=${MERGE_ID%%;*}
    mapfile -t TASKS < <(squeue -h -r -j"$ARRAY_ID" -o '%K' | sort -n)
    say "submitted array job $ARRAY_ID (tasks ${TASKS[*]}${BENCH_ARRAY:+, --array=$BENCH_ARRAY})" \
        "and merge job $MERGE_ID (afterok:$ARRAY_ID)"

    local deadline=$((SECONDS + WAIT_TIMEOUT)) queue line="" previous=""
    while :; do
        if ! queue=$(squeue -h -r -o '%i %T %r'); then
            say "squeue failed; trying again"
            sleep 5
            continue
        fi
        queue=$(awk -v a="${ARRAY_ID}_" -v m="$MERGE_ID" 'index($1, a) == 1 || $1 == m' <<< "$queue")
        [[ -n $queue ]] || break
        line=$(awk -v m="$MERGE_ID" '
            $1 == m { merge = $2 (($3 == "None") ? "" : " (" $3 ")"); next }
            { n[$2]++ }
            END { for (s in n) tasks = tasks (tasks == "" ? "" : ", ") n[s] " " s
                  print "array: " (tasks == "" ? "done" : tasks) "; merge: " (merge == "" ? "done" : merge) }' <<< "$queue")
        [[ $line != "$previous" ]] && say "$line"
        previous=$line
        if grep -q "^$MERGE_ID PENDING DependencyNeverSatisfied" <<< "$queue"; then
            say "merge job $MERGE_ID can never run (a task failed): cancelling it"
            scancel "$MERGE_ID"
        fi
        if ((SECONDS > deadline)); then
            say "WAIT_TIMEOUT=$WAIT_TIMEOUT s reached: cancelling the jobs"
            scancel "$ARRAY_ID" "$MERGE_ID"
            break
        fi
        sleep 3
    done
    JOBS_DONE=1
    sleep 1      # slurmctld writes the completion record as a job ends: let the last one land
    tail -c +"$jobcomp_from" "$JOBCOMP_LOG" > "$RUN_DIR/jobcomp.log"
    # every task submitted, and any that squeue had not listed yet
    mapfile -t TASKS < <({ printf '%s\n' "${TASKS[@]}"; grep -o "ArrayJobId=$ARRAY_ID ArrayTaskId=[0-9]*" \
        "$RUN_DIR/jobcomp.log" | sed 's/.*=//'; } | grep . | sort -nu)

    echo "Final states (from $JOBCOMP_LOG):"
    local task ok=0 failed=0
    for task in "${TASKS[@]}"; do
        if describe "task $task" "$ARRAY_ID" "$task"; then
            ok=$((ok + 1))
        else
            failed=$((failed + 1))
            show_log_tail "$RUN_DIR/bench-shard-${ARRAY_ID}_$task.err" 3
        fi
    done
    FAILED_TASKS=$failed
    SLURM_SUMMARY="array job $ARRAY_ID: $ok of ${#TASKS[@]} tasks COMPLETED with exit 0"
    if describe merge "$MERGE_ID"; then
        SLURM_SUMMARY+="; merge job $MERGE_ID COMPLETED"
        MERGE_OK=1
    elif ((failed)); then
        SLURM_SUMMARY+="; merge job $MERGE_ID never ran (its afterok failed with the tasks)"
    else
        SLURM_SUMMARY+="; merge job $MERGE_ID did not complete"
        show_log_tail "$RUN_DIR/bench-merge-$MERGE_ID.err" 5
    fi
}

compare_with_unsharded() {
    local merged=$RUN_DIR/bench/monitoring_export/bench.csv
    local single=$RUN_DIR/unsharded/monitoring_export/bench.csv
    echo "Merge job's output ($RUN_DIR/bench-merge-$MERGE_ID.out):"
    sed 's/^/    /' "$RUN_DIR/bench-merge-$MERGE_ID.out"
    say "unsharded bench, same flags, into $RUN_DIR/unsharded"
    if ! "$VENV/bin/python" "$REPO/self_healing_production_final.py" --bench --out "$RUN_DIR/unsharded" \
        "${FLAGS[@]}" > "$RUN_DIR/unsharded.log" 2>&1; then
        show_log_tail "$RUN_DIR/unsharded.log" 5
        CSV_SUMMARY="the unsharded run failed: see $RUN_DIR/unsharded.log"
        return 1
    fi
    if cmp "$merged" "$single"; then
        CSV_SUMMARY="merged bench.csv is byte for byte the unsharded one"
        CSV_SUMMARY+=" ($(stat -c %s "$merged") bytes, $(($(wc -l < "$merged") - 1)) rows)"
        return 0
    fi
    diff <(head -n 5 "$merged") <(head -n 5 "$single") | sed 's/^/    /' || true
    CSV_SUMMARY="merged bench.csv differs from the unsharded one"
    return 1
}

# --- main --------------------------------------------------------------------------------------

cleanup() {
    local status=$?
    if [[ -n ${ARRAY_ID:-} && -z ${JOBS_DONE:-} ]]; then
        scancel "$ARRAY_ID" "${MERGE_ID:-}" 2> /dev/null || true
    fi
    if [[ ${KEEP_SLURM:-0} == 1 ]]; then
        [[ -s $PID_FILE ]] && say "KEEP_SLURM=1: daemons left running ($(tr '\n' ' ' < "$PID_FILE"));" \
            "stop them with: $0 --stop"
    else
        stop_daemons
    fi
    exit "$status"
}

[[ $EUID -eq 0 ]] || die "run as root: it installs packages and starts daemons"
if [[ ${1:-} == --stop ]]; then
    stop_daemons
    exit 0
fi
WORK_DIR=""
if [[ $# -gt 0 && $1 != -- ]]; then
    WORK_DIR=$1
    shift
fi
if [[ $# -gt 0 ]]; then
    [[ $1 == -- ]] || die "usage: $0 [WORK_DIR] [-- BENCH_FLAGS...]"
    shift
fi
FLAGS=("$@")
((${#FLAGS[@]})) || FLAGS=("${TINY_BENCH[@]}")
[[ -n $WORK_DIR ]] || WORK_DIR=$(mktemp -d /tmp/self-healing-slurm.XXXXXX)
mkdir -p "$WORK_DIR"
WORK_DIR=$(cd "$WORK_DIR" && pwd -P)
inside_repo "$WORK_DIR" && die "WORK_DIR $WORK_DIR is inside the repository: give one outside it"
[[ -n ${VENV:-} ]] && inside_repo "$VENV" && die "VENV $VENV is inside the repository"
RUN_DIR=$WORK_DIR/runs/$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN_DIR"
MERGE_OK=0
FAILED_TASKS=0

say "repository $REPO; this run's folder $RUN_DIR"
say "bench flags: ${FLAGS[*]}"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
install_packages
start_cluster
make_venv
run_jobs
CSV_SUMMARY="not compared: the Slurm run did not complete"
VERDICT=FAIL
if ((MERGE_OK)) && compare_with_unsharded; then
    ((FAILED_TASKS == 0)) && VERDICT=PASS
fi
echo
echo "== Summary =="
echo "  cluster:  node $NODE, $(nproc) CPUs, partition debug ($SLURM_CONF);" \
     "daemons started by this script: $(tr '\n' ' ' < "$PID_FILE" 2> /dev/null || echo none)"
echo "  Slurm:    $SLURM_SUMMARY"
echo "  bench:    $CSV_SUMMARY"
echo "  logs:     $RUN_DIR"
echo "  $VERDICT"
[[ $VERDICT == PASS ]]
