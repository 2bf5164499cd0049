"""The run directory: its state file, event log, parameter files, checkpoints and progress."""
