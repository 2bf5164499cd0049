"""Training runs: the distributed loop around the coordinator, and the one-process reference."""
