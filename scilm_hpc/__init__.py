"""scilm_hpc: fine-tune, compress and evaluate scientific language models on Slurm clusters.

The package is organised by concept: ``config`` (schema, loading, validation),
``cli`` (the ``scilm`` entry point), ``data`` (corpus readers, HDF5 shards),
``train``, ``compress``, ``evaluate``, ``runtime`` (what a running rank uses: rank
wiring, signals, status) and ``launch`` (executors: how a job is submitted).
"""

__version__ = "0.1.0"
