"""Compression: pruning, recovery distillation and quantisation of an exported model.

``job.CompressJob`` runs a recipe (``configs/compress/NAME.yaml``) step by step;
``saving.load_compressed`` is the one call that loads what it writes::

    from scilm_hpc.compress import load_compressed
    model = load_compressed("RUN_DIR/compressed")
"""

from scilm_hpc.compress.saving import load_compressed

__all__ = ["load_compressed"]
