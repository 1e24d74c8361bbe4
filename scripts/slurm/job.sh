#!/bin/sh
# What train.sbatch and test.sbatch run, in the repository: the launcher's environment from the
# allocation (python -m commands.slurm: NNODES, NGPUS, MASTER_ADDR, MASTER_PORT), then one srun
# task per node running train.sh / test.sh with NODE_RANK = that node's SLURM_NODEID (torchrun
# inside starts NGPUS processes there). Training always resumes (resume auto, before the user's
# overrides, which win): a requeued job continues from last.pth. A run stopped by SIGTERM (the
# --signal the job scripts ask for before the time limit, or a preemption) exits 143 after saving
# last.pth; the job then requeues itself (scontrol requeue), so it goes on where it stopped.
set -u
mode=$1; shift
if [ $# -lt 2 ]; then
    echo "usage: sbatch [--nodes N] [--gpus-per-node G] scripts/slurm/$mode.sbatch <dataset> <exp_name> [KEY VALUE ...]" >&2
    exit 2
fi
dataset=$1; exp_name=$2; shift 2
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHON
assignments=$("$PYTHON" -m commands.slurm) || exit 2
eval "$assignments"
export NNODES NGPUS MASTER_ADDR MASTER_PORT
extra=
[ "$mode" = train ] && extra="resume auto"
echo "$mode.sbatch: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $NGPUS process(es), master $MASTER_ADDR:$MASTER_PORT"
# the batch shell itself may get the SIGTERM of a preemption too: it waits for the training to save
trap 'echo "$mode.sbatch: SIGTERM; waiting for the run to save and stop"' TERM
# shellcheck disable=SC2086  # $extra: two words or none
${SRUN:-srun} --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    sh -c 'NODE_RANK=$SLURM_NODEID; export NODE_RANK; exec sh "$@"' "$mode.sbatch" "$mode.sh" \
    "$dataset" "$exp_name" $extra "$@"
status=$?
if [ "$status" -eq 143 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "$mode.sbatch: stopped by SIGTERM (last.pth saved); requeueing job $SLURM_JOB_ID to continue"
    ${SCONTROL:-scontrol} requeue "$SLURM_JOB_ID" || echo "$mode.sbatch: scontrol requeue failed; resubmit the same command (it resumes)" >&2
fi
exit "$status"
