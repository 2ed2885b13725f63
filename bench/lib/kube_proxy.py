"""kube-proxy's iptables-mode NAT layout, written as one nftables ruleset: what bench/services
measures xoverlay's load balancer against."""
from __future__ import annotations

KP_MARK = 0x4000                         # kube-proxy's masquerade mark


def kube_proxy_nft(table: str, services: list[dict]) -> str:
    """An nftables ruleset laid out the way kube-proxy's iptables mode lays out its nat
    table (pkg/proxy/iptables/proxier.go): a dispatch chain (KUBE-SERVICES) with one rule
    per service port, in order, each jumping to that service port's chain (KUBE-SVC-*),
    which marks hairpin traffic (from one of its own endpoints) for masquerade and DNATs
    to an endpoint picked at random (`numgen random mod N`, for the iptables mode's
    `statistic --mode random` rules). A packet to the LAST service walks every dispatch
    rule before it: kube-proxy's worst case. NAT rules see only a connection's first
    packet; conntrack translates the rest.

    kube-proxy also has a chain per endpoint (KUBE-SEP-*) between the two; here the
    endpoint's rules sit in the service's chain instead: nft 1.0.6 took 77 s to load
    10,000 services with their 20,000 endpoint chains (and 150 s to replace them), ~25 s
    without, and one jump more or less per connection is not what this measures.

    services: [{"name", "vip", "ports": ["80/tcp", ...], "backends": [(ip, port or 0)]}]"""
    out = [f"table ip {table} {{",
           "  chain prerouting { type nat hook prerouting priority dstnat; policy accept; jump services; }",
           "  chain output { type nat hook output priority -100; policy accept; jump services; }",
           "  chain postrouting { type nat hook postrouting priority srcnat; policy accept; "
           f"meta mark & {KP_MARK:#x} == {KP_MARK:#x} masquerade; }}"]
    dispatch = []
    for i, svc in enumerate(services):
        for p in svc["ports"]:
            number, proto = p.split("/")
            chain = f"svc-{i}-{proto}{number}"
            dispatch.append(f"    ip daddr {svc['vip']} {proto} dport {number} jump {chain};")
            ends = [f"{ip}:{port or number}" for ip, port in svc["backends"]]
            # KUBE-SEP-*'s first rule, for each endpoint (an anonymous set here costs nft
            # another set per chain: 99 s to load 10,000 services).
            hairpin = " ".join(f"ip saddr {ip} meta mark set mark | {KP_MARK:#x};"
                               for ip in sorted({ip for ip, _ in svc["backends"]}))
            if len(ends) == 1:
                dnat = f"dnat to {ends[0]}"
            else:
                dnat = (f"dnat to numgen random mod {len(ends)} map {{ "
                        + ", ".join(f"{j} : {e.split(':')[0]}" for j, e in enumerate(ends)) + " }"
                        + f":{svc['backends'][0][1] or number}")
            out.append(f"  chain {chain} {{ {hairpin} meta l4proto {proto} {dnat}; }}")
    out.append("  chain services {")
    out += dispatch
    out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"
