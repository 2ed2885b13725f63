class XoError(Exception):
    """A problem the user can fix: shown as one line, exit status 1, nothing changed."""
