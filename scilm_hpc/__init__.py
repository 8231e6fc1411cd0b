"""scilm_hpc: fine-tune, compress and evaluate scientific language models on Slurm clusters.

The package is organised by concept: ``config`` (schema, loading, validation),
``cli`` (the ``scilm`` entry point), ``data`` (corpus readers, HDF5 shards),
``train``, ``compress``, ``evaluate``, ``runtime`` (what a running rank uses: rank
wiring, signals, status) and ``launch`` (executors: how a job is submitted).
"""

__version__ = "0.1.0"

import logging as _logging

# transformers imports torchao (a dependency) whenever it loads a model. On a CPU build
# torchao's import logs that its CUDA kernel libraries did not load, and torch's pytree
# warns about the enums torchao registers: two screens of noise in every job's log for a
# user who never asked for torchao. Their loggers only say errors in scilm's processes.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
