#!/usr/bin/env bash
# Install the system packages the MPI and Slurm test tiers need (Debian/Ubuntu), if missing.
set -euo pipefail
PACKAGES=(openmpi-bin libopenmpi-dev libpmix-dev slurm-wlm munge ninja-build build-essential)
need=0
for cmd in mpirun slurmctld slurmd munged ninja g++; do
    command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$cmd" >/dev/null 2>&1 || need=1
done
[ "$need" -eq 0 ] && { echo "system packages: present"; exit 0; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "need root (or sudo) to install: ${PACKAGES[*]}" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
echo "system packages: installed ${PACKAGES[*]}"
