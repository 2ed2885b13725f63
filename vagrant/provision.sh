#!/usr/bin/env bash
# Provision one VM: install as the README does, point xoverlay at the cluster's etcd
# (node1 serves it, over TLS with client certificates from vagrant/make-certs), start
# the node's agent.
#   provision.sh NODE_NAME UNDERLAY_IP ETCD_IP
set -euo pipefail
node="$1"
ip="$2"
etcd_ip="$3"
cd /opt/xoverlay
./setup.sh
tls=/opt/xoverlay/vagrant/tls
[ -f "$tls/ca.crt" ] || { echo "provision: no $tls/ca.crt (vagrant/make-certs runs before up)" >&2; exit 1; }

# Every xoverlay command on this VM (agent, CLI, vagrant/check) finds the store this way.
cat > /etc/profile.d/xoverlay.sh <<ENV
export XOVERLAY_STORE=etcd://$etcd_ip:2379
export XOVERLAY_STORE_CA=$tls/ca.crt
export XOVERLAY_STORE_CERT=$tls/$node.crt
export XOVERLAY_STORE_KEY=$tls/$node.key
ENV
. /etc/profile.d/xoverlay.sh

if [ "$ip" = "$etcd_ip" ] && ! pgrep -x etcd >/dev/null; then
    xoverlay store serve --listen "$etcd_ip:2379" --tls-cert "$tls/etcd.crt" --tls-key "$tls/etcd.key" \
        --client-ca "$tls/ca.crt" --detach
fi
# The VMs may be provisioned in parallel (libvirt): wait for the store.
for _ in $(seq 60); do xoverlay network ls >/dev/null 2>&1 && break; sleep 2; done
xoverlay network ls >/dev/null

# The private network's device is whichever one carries our address.
underlay=$(ip -o -4 addr show | awk -v ip="$ip" '$4 ~ "^"ip"/" {print $2; exit}')
[ -n "$underlay" ] || { echo "provision: no device has $ip" >&2; exit 1; }
# As on a Docker host: the underlay forwards, so the data path can ask the kernel's FIB
# for the next hop (docs/DESIGN.md, "Out of the underlay"; lint underlay-not-forwarding).
sysctl -qw "net.ipv4.conf.$underlay.forwarding=1"
xoverlay down --node "$node" >/dev/null 2>&1 || true
xoverlay up --node "$node" --underlay "$underlay" --detach
xoverlay peer ls --node "$node"
