"""pipetrain: train a neural network across OS processes, bitwise equal to one process.

The packages are layers; a module imports only from its own package and the ones below it
(``tests/test_layout.py`` holds this, and that no import goes round in a cycle)::

    cli                      the command line
    train                    the training loop around the coordinator; the reference trainer
    runtime                  processes: messages, topology, signals, worker, coordinator, launchers
    config                   the resolved, validated run configuration
    run                      the run directory: state, events, checkpoints, progress
    pipeline                 schedules as data, partitioning, one stage's compute
    wire                     frames and channels (pipes, MPI), the chain all-reduce
    data                     datasets, the sampler, augmentation, the threaded loader
    nn                       pure numpy math: layers, loss, optimizers, digests
    hooks, status, threads   the fault seam, exit codes and states, helper threads
"""

__version__ = "0.2.0"
