#!/bin/sh
# Usage: sh train.sh <dataset> <exp_name> [KEY VALUE ...]
#   uses config/<dataset>/<dataset>_<exp_name>.yaml, writes exp/<dataset>/<exp_name>/{model,result}
#   (with shot K, K != 1: exp/<dataset>/<exp_name>_shotK, the K-shot model's own experiment)
#   NGPUS=4 sh train.sh ...        one node, 4 processes through torchrun
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host MASTER_PORT=29500 NGPUS=8 sh train.sh ...   several nodes
exec sh "$(dirname "$0")/scripts/launch.sh" train "$@"
