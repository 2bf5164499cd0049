"""``python -m pipetrain``: the command line (the same as the ``pipetrain`` script)."""

from pipetrain.cli import main

main()
