"""ctl/links.py helpers that need no namespace of their own (reads of this one only)."""
from pyroute2 import IPRoute

from ctl import links


def test_stray_acks_of_get_requests_are_dropped():
    """pyroute2 leaves the ACK of every "get" in a queue nothing reads: the agent's RSS
    grew 2.2 MiB a minute from them (docs/RELIABILITY.md, soak). Dropping them leaves
    the socket working."""
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        links.drop_unclaimed_replies(ipr)
        for _ in range(20):
            ipr.link_lookup(ifname="lo")
            ipr.get_links(lo)
        stray = ipr.asyncore.msg_queue.root.qsize()
        assert stray == 40, "pyroute2 no longer leaves ACKs behind? Then drop_unclaimed_replies can go"
        assert links.drop_unclaimed_replies(ipr) == stray
        assert ipr.asyncore.msg_queue.root.empty()
        assert ipr.get_links(lo)[0].get_attr("IFLA_IFNAME") == "lo"
        assert links.drop_unclaimed_replies(ipr) == 1
