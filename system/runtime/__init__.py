"""The processes of a run: control messages, topology, signals, workers, coordinator, launchers."""
