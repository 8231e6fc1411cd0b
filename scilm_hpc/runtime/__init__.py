"""What a rank uses while it runs: rank and environment wiring, the communicator,
hardware defaults, signals and requeue, progress output, hang and lost-peer detection,
the run's history, state and heartbeat, the run lock, and what Slurm says about the
run's jobs.

Everything above it (data, tasks, compress, evaluate, train, jobs) may import it; it
imports only the base layer. Submitting a job is ``launch``'s business, not this one's.
"""
