"""An agent whose node was taken out of the store (`xoverlay down` from another machine)
stops instead of retrying, told by the error's type, not its words."""
from __future__ import annotations

import pytest

from xoverlay.agent.loop import Agent
from xoverlay.errors import NodeRemoved, XoError
from xoverlay.store.memory import MemoryStore


def test_a_pass_on_a_node_the_store_no_longer_has_stops_the_agent():
    agent = Agent("gone", "none", MemoryStore(), ipr=None, dns=False)
    with pytest.raises(NodeRemoved, match="node gone was removed from the store"):
        agent.reconcile()
    agent._pass(-1, 0.0)
    assert agent.stopping


def test_other_errors_of_a_pass_do_not_stop_the_agent(monkeypatch):
    agent = Agent("n1", "none", MemoryStore(), ipr=None, dns=False)

    def fails(changes=None):
        raise XoError("node n1 was removed from the store, says an unrelated error")
    monkeypatch.setattr(agent, "reconcile", fails)
    agent._pass(-1, 0.0)
    assert not agent.stopping
