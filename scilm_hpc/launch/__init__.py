"""Launching: executors (this process, local subprocesses, Slurm through submitit) and
rank / environment wiring for multi-process jobs."""
