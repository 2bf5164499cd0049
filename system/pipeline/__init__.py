"""Pipeline parallelism as plain code: schedules as data, partitioning, one stage's compute."""
