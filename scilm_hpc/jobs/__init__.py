"""The four jobs: prepare, finetune, compress, evaluate.

Each job is a submitit-callable class that the CLI hands to an executor, and runs
once per rank. Jobs sit on top of the concept folders (``data``, ``tasks``,
``train``, ``compress``, ``evaluate``) and the rank wiring (``runtime``); only the
submitting side (``launch``, the CLI) is above them. Finetune and compress share
their rank start-up and shut-down (``jobs.startup``).
"""
