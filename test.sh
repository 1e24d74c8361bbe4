#!/bin/sh
# Usage: sh test.sh <dataset> <exp_name> [KEY VALUE ...]   e.g. sh test.sh pascal split0_resnet50 shot 5 weight last
#   evaluates exp/<dataset>/<exp_name>/model/best.pth (weight best|last|PATH); NGPUS=N shards the episodes
exec sh "$(dirname "$0")/scripts/launch.sh" test "$@"
