"""The scenario harness: runs pipetrain under scripted faults and judges the result.

Roles kept apart (after Jepsen): the *workload* is a real ``pipetrain train`` run; the *faults*
(``pipetrain_harness.faults``, one module per kind) act on its processes and pipes, from outside
or through the system's hooks seam (``pipetrain_harness.hooks``); the *monitor* samples every
process with psutil; the *checks* judge one shared, timestamped *history* afterwards.

Installed as ``pipetrain_harness``, beside ``pipetrain`` and not inside it: the harness imports
the system, the system never imports the harness, and the import names say which is which.
"""
