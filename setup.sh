#!/usr/bin/env bash
# Set up xoverlay on Debian 12 (as root, idempotent), then optionally run something:
#   ./setup.sh          install only
#   ./setup.sh demo     install, bring up the 3-node namespace lab, show traffic and tables
#   ./setup.sh test     install, run the whole test suite
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv"

say() { printf '\033[1m== %s\033[0m\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root (it installs packages and loads BPF programs)" >&2; exit 1; }

packages=(
  python3-bpfcc bpfcc-tools libbpf1 linux-headers-amd64 bpftool   # BCC, libbpf, headers BCC compiles against
  python3-venv iproute2 iputils-ping ethtool kmod util-linux procps # venv, ip/tc/nsenter, ping, sysctl
  iperf3 sockperf nftables tmux curl                               # nftables: egress (masquerade); benchmarks, baselines, TUI checks
  etcd-server openssl                                              # the cluster store (docs/STORE.md), test certs
  qemu-system-x86 linux-image-amd64 busybox-static                 # the VM lab: qemu, Debian 12's kernel, virtme-ng's init
  docker.io                                                        # Docker 20.10: the plugin's tests (lab up --docker)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # Debian starts the package's own etcd (127.0.0.1:2379, /var/lib/etcd) on install. We
  # installed it for the binary: `xoverlay store serve` runs it with our flags on that port.
  if [[ " ${missing[*]} " == *" etcd-server "* ]] && [ -d /run/systemd/system ]; then
    say "disabling Debian's default etcd service (xoverlay store serve runs etcd instead)"
    systemctl disable --now etcd.service >/dev/null 2>&1 || true
  fi
fi

# BCC compiles against /lib/modules/$(uname -r)/build. A kernel without its own headers
# package (a cloud or CI kernel) gets Debian's newest headers, which is enough for BCC's
# kernel-independent programs.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  [ -n "$hdr" ] || { echo "setup.sh: no linux-headers-*-amd64 under /usr/src" >&2; exit 1; }
  common="${hdr%-amd64}-common"
  say "linking $kdir/build -> $hdr"
  mkdir -p "$kdir"
  ln -sfn "$hdr" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
fi

mountpoint -q /sys/fs/bpf || { say "mounting bpffs on /sys/fs/bpf"; mount -t bpf bpf /sys/fs/bpf; }

# Debian's python3 sees Debian's bcc; the pyenv python3 that may come first on PATH does not.
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
if ! "$venv/bin/python" -c "import xoverlay, pyroute2, click, rich, pytest, scapy, hypothesis" 2>/dev/null \
   || [ "$here/pyproject.toml" -nt "$venv/.installed" ]; then
  say "installing xoverlay into $venv"
  log=$(mktemp)
  if ! { "$venv/bin/pip" install -q --upgrade pip && "$venv/bin/pip" install -q -e "$here[test,bench]"; } >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; echo "setup.sh: pip install failed" >&2; exit 1
  fi
  rm -f "$log"
  touch "$venv/.installed"
fi
"$venv/bin/python" -c "import bcc" || { echo "setup.sh: the venv cannot import Debian's bcc" >&2; exit 1; }
ln -sfn "$venv/bin/xoverlay" /usr/local/bin/xoverlay

case "${1:-}" in
  "") say "installed: xoverlay is $(command -v xoverlay)";;
  demo) exec xoverlay lab demo;;
  test) shift; cd "$here"; exec "$venv/bin/python" -m pytest "$@";;
  *) echo "setup.sh: unknown action '$1' (use demo or test)" >&2; exit 2;;
esac
