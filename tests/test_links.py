"""xoverlay/kernel/veth.py and gateway.py helpers that need no namespace of their own
(reads of this one only)."""
from pyroute2 import IPRoute

from xoverlay.kernel import gateway, veth


def test_stray_acks_of_get_requests_are_dropped():
    """pyroute2 leaves the ACK of every "get" in a queue nothing reads: the agent's RSS
    grew 2.2 MiB a minute from them (docs/RELIABILITY.md, soak). Dropping them leaves
    the socket working."""
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        veth.drop_unclaimed_replies(ipr)
        for _ in range(20):
            ipr.link_lookup(ifname="lo")
            ipr.get_links(lo)
        stray = ipr.asyncore.msg_queue.root.qsize()
        assert stray == 40, "pyroute2 no longer leaves ACKs behind? Then drop_unclaimed_replies can go"
        assert veth.drop_unclaimed_replies(ipr) == stray
        assert ipr.asyncore.msg_queue.root.empty()
        assert ipr.get_links(lo)[0].get_attr("IFLA_IFNAME") == "lo"
        assert veth.drop_unclaimed_replies(ipr) == 1


def _rule(priority, table, action=1, src=None, dst=None, **more):
    """An IPv4 rule as pyroute2 reads it (the attributes gateway.rule_shape looks at)."""
    attrs = [("FRA_TABLE", table), ("FRA_SUPPRESS_PREFIXLEN", 0xffffffff), ("FRA_PROTOCOL", 2)]
    if priority:
        attrs.append(("FRA_PRIORITY", priority))
    if src:
        attrs.append(("FRA_SRC", src))
    if dst:
        attrs.append(("FRA_DST", dst))
    attrs += list(more.items())
    return {"attrs": attrs, "dst_len": 32 if dst else 0, "src_len": 32 if src else 0, "tos": 0,
            "table": table if table < 256 else 252, "action": action, "flags": 0}


KERNEL = [_rule(0, 255), _rule(32766, 254), _rule(32767, 253)]
OURS = _rule(gateway.RETURN_RULE_PRIORITY, gateway.RETURN_TABLE, src=veth.GATEWAY_IP)


def suffices(rules):
    return gateway.main_table_suffices(gateway.rule_shape(r) for r in rules)


def test_the_main_table_suffices_only_under_the_kernels_rules_and_ours():
    """The data path skips the policy rules (XO_CFG_FIB_MAIN_ONLY) only when they could
    not route its packets anywhere but by main: any rule of the operator's, a default one
    missing or changed, or ours matching more than DNS replies, and it must not."""
    assert suffices(KERNEL)
    assert suffices(KERNEL + [OURS])
    assert not suffices(KERNEL + [OURS, _rule(100, 100, dst="192.0.2.2")])
    assert not suffices(KERNEL + [_rule(100, 254, FRA_FWMARK=1)])           # a match on a mark
    assert not suffices(KERNEL + [_rule(200, 253)])                          # default table first
    assert not suffices(KERNEL[1:] + [OURS])                                 # no `lookup local`
    assert not suffices([KERNEL[0], _rule(32766, 254, action=2), KERNEL[2], OURS])   # main -> goto
    assert not suffices(KERNEL + [_rule(gateway.RETURN_RULE_PRIORITY, gateway.RETURN_TABLE, src="192.0.2.1")])
    suppress = _rule(32766, 254)
    suppress["attrs"][1] = ("FRA_SUPPRESS_PREFIXLEN", 0)                   # main, suppress_prefixlength 0
    assert not suffices([KERNEL[0], suppress, KERNEL[2]])


def test_egress_rules_keep_the_main_table_sufficient():
    """The replies' rules (to a network's subnet, lookup RETURN_TABLE) never match an
    underlay peer: with them the data path may still look peers up in main alone. A rule
    of that priority and table that matches anything more is the operator's."""
    egress = _rule(gateway.EGRESS_RULE_PRIORITY, gateway.RETURN_TABLE, dst="10.10.0.0")
    egress["dst_len"] = 16
    assert suffices(KERNEL + [OURS, egress])
    marked = _rule(gateway.EGRESS_RULE_PRIORITY, gateway.RETURN_TABLE, dst="10.10.0.0", FRA_FWMARK=1)
    assert not suffices(KERNEL + [OURS, marked])
    assert not suffices(KERNEL + [OURS, _rule(gateway.EGRESS_RULE_PRIORITY, gateway.RETURN_TABLE)])
