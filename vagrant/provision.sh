#!/usr/bin/env bash
# Provision one VM: install as the README does, then start the node's agent.
#   provision.sh NODE_NAME UNDERLAY_IP
set -euo pipefail
node="$1"
ip="$2"
cd /opt/xoverlay
./setup.sh
# The private network's device is whichever one carries our address.
underlay=$(ip -o -4 addr show | awk -v ip="$ip" '$4 ~ "^"ip"/" {print $2; exit}')
[ -n "$underlay" ] || { echo "provision: no device has $ip" >&2; exit 1; }
xoverlay down --node "$node" >/dev/null 2>&1 || true
xoverlay up --node "$node" --underlay "$underlay" --detach
xoverlay peer ls --node "$node"
