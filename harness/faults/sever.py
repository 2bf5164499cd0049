"""sever: the sending stage closes one link's pipe at its frame: instead of sending it
(``when = "before"``, the default) or right after (``"after"``). The receiver reads end-of-file
and the worker group restarts once."""

from __future__ import annotations

from pipetrain_harness.faults._link import LINK_PARAMS, LinkFault


class Sever(LinkFault):
    kind = "sever"
    params = LINK_PARAMS
    default_for_steps = 1
    restarts = 1
    takes_when = True


FAULT = Sever
