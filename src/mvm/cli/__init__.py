"""mvmctl, the command line (click + rich)."""
