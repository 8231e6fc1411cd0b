#!/bin/bash

# Parameters
#SBATCH --cpus-per-task=1
#SBATCH --error=RUN_DIR/submitit/%j_0_log.err
#SBATCH --job-name=scilm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=RUN_DIR/submitit/%j_0_log.out
#SBATCH --partition=dev
#SBATCH --signal=USR2@30
#SBATCH --time=30
#SBATCH --wckey=submitit

# setup

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output RUN_DIR/submitit/%j_%t_log.out --error RUN_DIR/submitit/%j_%t_log.err PYTHON -u -m submitit.core._submit RUN_DIR/submitit
