class XoError(Exception):
    """A problem the user can fix: shown as one line, exit status 1, nothing changed."""


class StoreError(XoError):
    """The state store cannot be read or written (locked, unreadable, corrupt): the agent
    keeps the data path as it is and retries."""


class NodeRemoved(XoError):
    """This node is no longer in the store (`xoverlay down` ran, here or elsewhere): its
    agent stops instead of retrying."""
