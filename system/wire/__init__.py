"""How arrays move between processes: frames, channels (pipes, MPI), the chain all-reduce."""
