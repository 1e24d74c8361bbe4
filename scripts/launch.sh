#!/bin/sh
# Shared launcher of train.sh and test.sh: finds config/<dataset>/<dataset>_<exp_name>.yaml, asks
# python for the experiment folder (which it creates, with a copy of the config), runs python (or
# torchrun when NGPUS > 1) with the arguments as given and tees a timestamped log there;
# Ctrl-C / SIGTERM reach python once, the log stays complete and python's exit status is returned.
set -u
mode=$1; shift
if [ $# -lt 2 ]; then
    echo "usage: sh $mode.sh <dataset> <exp_name> [KEY VALUE ...]   e.g. sh $mode.sh pascal split0_resnet50" >&2
    exit 2
fi
dataset=$1; exp_name=$2; shift 2
# a relative path typed on the command line is taken from the folder it was typed in (util/config.py
# resolve_paths); this script runs python from the repository, so it passes that folder on
NTRENETPP_CALLER_DIR=${NTRENETPP_CALLER_DIR:-$PWD}
export NTRENETPP_CALLER_DIR
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2
if [ ! -d "config/$dataset" ]; then
    echo "unknown dataset '$dataset': no folder config/$dataset (have: $(ls config | tr '\n' ' '))" >&2
    exit 2
fi
config=config/$dataset/${dataset}_${exp_name}.yaml
if [ ! -f "$config" ]; then
    echo "no config $config; the $dataset configs are:" >&2
    ls "config/$dataset" | sed "s/^${dataset}_/  /; s/\.yaml$//" >&2
    exit 2
fi
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# the experiment folder is Python's to decide (util/config.py: exp/<dataset>/<exp_name>, with
# _shotK for a shot other than the config's; save_path overrides it): asked here for the log's place.
# It first checks everything that needs no data (engine/preflight.py): a refused run creates nothing.
answer=$("$PYTHON" -m commands.folder --prog "$mode.sh" --config "$config" "$@") || exit 2
exp_dir=$(printf '%s\n' "$answer" | sed -n 1p)
# python removes the folder again (or, in an existing one, this log) when the run is refused at
# start-up, before its work began (engine/experiment.py StartupCleanup)
NTRENETPP_NEW_FOLDER=$(printf '%s\n' "$answer" | sed -n 2p)
export NTRENETPP_NEW_FOLDER
NGPUS=${NGPUS:-1}
if [ "$NGPUS" -gt 1 ] || [ "${NNODES:-1}" -gt 1 ]; then
    set -- -m torch.distributed.run --nproc_per_node="$NGPUS" --nnodes="${NNODES:-1}" \
        --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
        --master_port="${MASTER_PORT:-29500}" "$mode.py" --config "$config" "$@"
else
    set -- -u "$mode.py" --config "$config" "$@"
fi
[ "$exp_dir" = "exp/$dataset/$exp_name" ] || echo "this experiment's folder is $exp_dir" >&2
log=$exp_dir/result/$mode-$(date +%Y%m%d_%H%M%S)
# several nodes write into one (shared) folder, each its own log
[ "${NNODES:-1}" -gt 1 ] && log=$log-node${NODE_RANK:-0}
log=$log.log
export NTRENETPP_LOG=$log
# Python's output goes through a FIFO to tee, which ignores INT and TERM: a Ctrl-C (which the
# terminal sends to every process of the job) or a scheduler's SIGTERM must not kill tee while
# python is still writing the lines that say where it stopped. python runs in the background so
# that this shell can forward a SIGTERM sent to it alone (docker stop, kill PID); a Ctrl-C already
# reaches python from the terminal, so INT is not forwarded (a second copy would abort at once).
fifo_dir=$(mktemp -d) || exit 2
fifo=$fifo_dir/out
mkfifo "$fifo" || exit 2
( trap '' INT TERM; exec tee "$log" ) < "$fifo" &
tee_pid=$!
# the progress bar goes straight to the terminal (file descriptor 3), never into the log
if [ -t 1 ]; then
    exec 3>&1
    export NTRENETPP_PROGRESS_FD=3
fi
# an asynchronous command of a non-interactive shell starts with SIGINT ignored; this tells
# python (util/cli.py) to take Ctrl-C as usual. LAUNCHED_AS: for the "continue with" line.
export NTRENETPP_LAUNCHER=1
NTRENETPP_LAUNCHED_AS="sh $mode.sh $dataset $exp_name"
[ "$NGPUS" -gt 1 ] && NTRENETPP_LAUNCHED_AS="NGPUS=$NGPUS $NTRENETPP_LAUNCHED_AS"
[ "${NNODES:-1}" -gt 1 ] && NTRENETPP_LAUNCHED_AS="NNODES=$NNODES NODE_RANK=${NODE_RANK:-0} \
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29500} $NTRENETPP_LAUNCHED_AS"
export NTRENETPP_LAUNCHED_AS
PYTHONUNBUFFERED=1 "$PYTHON" "$@" > "$fifo" 2>&1 &
py_pid=$!
trap 'kill -TERM "$py_pid" 2>/dev/null' TERM
trap ':' INT
while :; do
    wait "$py_pid"
    status=$?
    kill -0 "$py_pid" 2>/dev/null || break   # else a trapped signal interrupted the wait
done
wait "$py_pid"; status=$?                   # the exit status itself (the shell keeps it)
wait "$tee_pid"
rm -rf "$fifo_dir"
[ -f "$log" ] && echo "log: $log"
exit "$status"
