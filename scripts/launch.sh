#!/bin/sh
# Shared launcher of train.sh and test.sh: checks the config, makes the experiment folder,
# copies the config there, runs python (or torchrun when NGPUS > 1) and tees a timestamped log.
set -u
mode=$1; shift
if [ $# -lt 2 ]; then
    echo "usage: sh $mode.sh <dataset> <exp_name> [KEY VALUE ...]   e.g. sh $mode.sh pascal split0_resnet50" >&2
    exit 2
fi
dataset=$1; exp_name=$2; shift 2
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
for arg in "$@"; do
    if [ "$arg" = "save_path" ]; then
        echo "$mode.sh keeps each experiment in exp/$dataset/$exp_name; to use another folder run" \
             "python $mode.py --config $config save_path DIR ... directly" >&2
        exit 2
    fi
done
exp_dir=exp/$dataset/$exp_name
mkdir -p "$exp_dir/model" "$exp_dir/result"
cp "$config" "$exp_dir/"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
NGPUS=${NGPUS:-1}
if [ "$NGPUS" -gt 1 ] || [ "${NNODES:-1}" -gt 1 ]; then
    set -- -m torch.distributed.run --nproc_per_node="$NGPUS" --nnodes="${NNODES:-1}" \
        --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
        --master_port="${MASTER_PORT:-29500}" "$mode.py" --config "$config" save_path "$exp_dir" "$@"
else
    set -- -u "$mode.py" --config "$config" save_path "$exp_dir" "$@"
fi
log=$exp_dir/result/$mode-$(date +%Y%m%d_%H%M%S).log
status_file=$(mktemp)
{ PYTHONUNBUFFERED=1 "$PYTHON" "$@"; echo $? > "$status_file"; } 2>&1 | tee "$log"
status=$(cat "$status_file"); rm -f "$status_file"
echo "log: $log"
exit "$status"
