"""The scenario harness: runs pipetrain under scripted faults and judges the result.

Roles kept apart (after Jepsen): the *workload* is a real ``pipetrain train`` run; the *faults*
(``pipetrain_harness.faults``, one module per kind) act on its processes and pipes; the *monitor* samples
every process with psutil; the *checks* judge one shared, timestamped *history* afterwards.
The harness imports ``system``; ``system`` never imports the harness.
"""
