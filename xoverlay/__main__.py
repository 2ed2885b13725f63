"""`python -m xoverlay ...` is the `xoverlay` command."""
from xoverlay.ui.cli import main

main()
