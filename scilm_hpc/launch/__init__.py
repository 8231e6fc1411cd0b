"""Submitting jobs: executors (this process, local subprocesses, Slurm through submitit),
the sbatch script, mpirun for local evaluation ranks, and sweeps.

It sits above the jobs it submits and below the CLI; nothing in the library's concept
folders imports it (what a running rank needs is ``runtime``)."""
