"""sever: the sending stage closes one link's pipe at ``at_step``; the receiver reads
end-of-file mid-run and the worker group restarts once (the fault acts only in the first
worker generation)."""

from __future__ import annotations

from pipetrain_harness.faults._link import LINK_PARAMS, LinkFault


class Sever(LinkFault):
    kind = "sever"
    params = LINK_PARAMS
    default_for_steps = 1
    restarts = 1


FAULT = Sever
