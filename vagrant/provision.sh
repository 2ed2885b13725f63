#!/usr/bin/env bash
# Provision one VM: install as the README does, point xoverlay at the cluster's etcd
# (node1 serves it, over TLS with client certificates from vagrant/make-certs), start
# the node's agent (vagrant/node-up, the same step the VM lab runs in its guests).
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
exec /opt/xoverlay/vagrant/node-up "$node" "$ip"
