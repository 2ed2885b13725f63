"""What a person sees: the CLI, status and its TUI, monitor, lints, service views."""
