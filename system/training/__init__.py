"""Training runs: the distributed loop around the coordinator, the one-process reference, and
the Python API (``pipetrain.train`` / ``pipetrain.reference`` are ``pipetrain.training.api``'s)."""
