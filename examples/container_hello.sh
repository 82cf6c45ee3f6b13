#!/bin/sh
# One task of nodegroups/container-hello.toml, run inside its container: where it runs
# (its node, the image from /etc/mnp-image, whether /run/.containerenv says
# "container"), its rank and the number of hostfile entries. It reads this file from
# the job's working directory, which mnp mounts into the container at the same path.
# $1: seconds to wait after printing (the main node waits for the workers to print).
test -f /run/.containerenv && where=container || where=host
image=$(cat /etc/mnp-image 2>/dev/null || echo none)
set -- "${1:-0}" $(cat "$MNP_HOSTFILE")
wait=$1
shift
echo "node $MNP_NODE_INDEX of $MNP_NUM_NODES: $image in $where, rank $RANK of $WORLD_SIZE, $# hosts"
sleep "$wait"
