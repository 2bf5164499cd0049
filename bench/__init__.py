"""pipetrain's benchmark suite: ``python -m bench.run`` (``tox -e bench``, ``pipetrain bench``)."""
