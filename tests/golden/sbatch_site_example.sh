#!/bin/bash

# Parameters
#SBATCH --account=my-project
#SBATCH --constraint=a100
#SBATCH --cpus-per-task=8
#SBATCH --error=RUN_DIR/submitit/%j_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=4
#SBATCH --job-name=scicite-ft
#SBATCH --mem=65536M
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=RUN_DIR/submitit/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=normal
#SBATCH --signal=USR2@300
#SBATCH --time=720
#SBATCH --wckey=submitit

# setup
module load cuda/12.4
source $HOME/venvs/scilm/bin/activate

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output RUN_DIR/submitit/%j_%t_log.out --error RUN_DIR/submitit/%j_%t_log.err PYTHON -u -m submitit.core._submit RUN_DIR/submitit
