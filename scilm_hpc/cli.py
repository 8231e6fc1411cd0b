"""The ``scilm`` command: parse, validate, hand a job object to an executor.

Exit status: 0 on success, 2 for any user mistake (bad config, bad corpus, bad
shards, missing model), printed one line per problem; 1 for anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scilm_hpc.config import load_and_validate, to_yaml
from scilm_hpc.errors import UserError
from scilm_hpc.schema import JobConfig

EXIT_USER_ERROR = 2


def _save_config(job: JobConfig) -> None:
    run_dir = Path(job.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = "config.yaml" if job.job == "finetune" else f"{job.job}.config.yaml"
    (run_dir / name).write_text(to_yaml(job), encoding="utf-8")


def _prepare(job: JobConfig) -> Callable[[], Any]:
    from scilm_hpc.jobs.prepare import PrepareJob

    return PrepareJob(job)


def _finetune(job: JobConfig) -> Callable[[], Any]:
    from scilm_hpc.jobs.finetune import FinetuneJob

    return FinetuneJob(job)


def _compress(job: JobConfig) -> Callable[[], Any]:
    from scilm_hpc.jobs.compress import CompressJob

    return CompressJob(job)


def _evaluate(job: JobConfig) -> Callable[[], Any]:
    from scilm_hpc.jobs.evaluate import EvaluateJob

    return EvaluateJob(job)


JOB_FACTORIES: dict[str, Callable[[JobConfig], Callable[[], Any]]] = {
    "prepare": _prepare,
    "finetune": _finetune,
    "compress": _compress,
    "evaluate": _evaluate,
}


def cmd_resume(args: argparse.Namespace) -> int:
    """``scilm resume RUN_DIR [key=value ...]``: run a finetune again from its latest checkpoint."""
    from scilm_hpc.train.checkpoint import latest_tag

    config = Path(args.run_dir) / "config.yaml"
    if not config.is_file():
        raise UserError(f"{args.run_dir}: no config.yaml; not a finetune run directory")
    tag = latest_tag(args.run_dir)
    if tag is None:
        raise UserError(
            f"{args.run_dir}: no complete checkpoint to resume from (checkpoints/latest is missing)"
        )
    print(f"resuming {args.run_dir} from {tag}", flush=True)
    args.job_file, args.command, args.dry_run, args.sweep = config, "finetune", False, []
    args.wait = False
    args.overrides = [*args.overrides, f"run.dir={args.run_dir}"]
    return cmd_job(args)


def _print_sbatch(job: JobConfig, array: int = 0) -> None:
    """For a Slurm profile: the exact sbatch script (of a job array of ``array``)."""
    if job.cluster.backend != "slurm":
        return
    from scilm_hpc.launch.executor import submitit_folder
    from scilm_hpc.launch.slurm import sbatch_script

    print("# ---- sbatch script (not submitted) ----")
    print(sbatch_script(job, submitit_folder(job), array=array), end="")


def cmd_job(args: argparse.Namespace) -> int:
    """``scilm prepare|... JOB.yaml [key=value ...]``."""
    from scilm_hpc.launch.executor import run_job

    if args.sweep:
        return _sweep(args)
    job = load_and_validate(args.job_file, args.overrides, job=args.command)
    if args.dry_run:
        print(to_yaml(job), end="")
        _print_sbatch(job)
        return 0
    _save_config(job)
    result = run_job(JOB_FACTORIES[args.command](job), job, wait=args.wait)
    print(json.dumps(result, indent=1))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """Validate every member first, then submit them together (one Slurm job array)."""
    from scilm_hpc.launch.executor import run_jobs
    from scilm_hpc.launch.sweep import member_dir, parse_sweep, sweep_members, write_sweep_index

    parent = load_and_validate(args.job_file, args.overrides, job=args.command)
    members = sweep_members(parse_sweep(args.sweep))
    jobs = [
        load_and_validate(
            args.job_file,
            [*args.overrides, *m, f"run.dir={member_dir(parent.run.dir, i)}"],
            job=args.command,
        )
        for i, m in enumerate(members)
    ]
    if args.dry_run:
        for i, m in enumerate(members):
            print(f"# member {member_dir(parent.run.dir, i)}: {' '.join(m)}")
        _print_sbatch(parent, array=len(jobs))
        return 0
    write_sweep_index(Path(parent.run.dir), members)
    for job in jobs:
        _save_config(job)
    results = run_jobs([JOB_FACTORIES[args.command](j) for j in jobs], jobs, parent, wait=args.wait)
    print(json.dumps(results, indent=1))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """``scilm status RUN_DIR``: job ids and states, step, last checkpoint, last metrics."""
    from scilm_hpc.launch.status import run_status

    print(json.dumps(run_status(Path(args.run_dir)), indent=1))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """``scilm cancel RUN_DIR``: cancel the run's Slurm jobs that are still queued or running."""
    from scilm_hpc.launch.status import cancel_run

    for line in cancel_run(Path(args.run_dir)):
        print(line)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``scilm export RUN_DIR [--tag step_N]``: write RUN_DIR/export from a checkpoint."""
    from scilm_hpc.train.export import export_checkpoint

    out = export_checkpoint(args.run_dir, args.tag)
    print(f"{out}: exported from {args.tag or 'the latest checkpoint'}")
    return 0


def cmd_import_model(args: argparse.Namespace) -> int:
    """``scilm import-model NAME OUT_DIR``: a packaged pretrained model as a HF directory."""
    from scilm_hpc.model_import import import_model

    out = import_model(args.name, args.out_dir)
    print(f"{out}: {args.name} written; use it as model.name_or_path={out}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """``scilm validate JOB.yaml [key=value ...] [--data]``: check, submit nothing."""
    job = load_and_validate(args.job_file, args.overrides)
    print(f"{args.job_file}: valid {job.job} job (run.dir={job.run.dir})")
    if args.data:
        from scilm_hpc.data.dataset import ShardDataset
        from scilm_hpc.data.shards import read_manifest
        from scilm_hpc.model_source import load_tokenizer

        manifest = read_manifest(job.data.shards)
        tokenizer = load_tokenizer(job.model.name_or_path, job.model.revision)
        for split in manifest["splits"]:
            dataset = ShardDataset(job.data.shards, split)
            dataset.check_tokenizer(tokenizer, job.model.name_or_path)
            dataset.verify_checksums()
            print(
                f"{job.data.shards}: {split}: {len(dataset)} examples, {dataset.n_tokens} "
                f"tokens in {len(dataset.shards)} shard(s), checksums match"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    parser = argparse.ArgumentParser(prog="scilm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in JOB_FACTORIES:
        p = sub.add_parser(name, help=f"run the {name} job")
        p.add_argument("job_file", help="job YAML (see jobs/)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-5")
        p.add_argument(
            "--dry-run", action="store_true", help="print the resolved config and run nothing"
        )
        p.add_argument(
            "--sweep",
            action="append",
            default=[],
            metavar="KEY=V1,V2",
            help="one run per combination of values (repeatable); on Slurm one job array",
        )
        p.add_argument(
            "--wait",
            action="store_true",
            help="with a Slurm profile: follow the job and stream rank 0's log",
        )
        p.set_defaults(func=cmd_job)
    p = sub.add_parser("status", help="job ids, state, step, last checkpoint, last metrics")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("cancel", help="cancel a run's queued or running Slurm jobs")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("resume", help="resume a finetune run from its latest checkpoint")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser("export", help="write RUN_DIR/export from a finetune checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_200 (default: latest)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser(
        "import-model", help="write a model shipped in a PyPI package as a HF directory"
    )
    p.add_argument("name", help="antiberty (pip install --no-deps antiberty==0.1.3)")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_import_model)
    p = sub.add_parser("validate", help="check a job config (and with --data its shards)")
    p.add_argument("job_file")
    p.add_argument("overrides", nargs="*")
    p.add_argument(
        "--data",
        action="store_true",
        help="also verify data.shards: checksums and tokenizer fingerprint",
    )
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scilm`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills the nargs="*" overrides only up to the first option, so
    # ``JOB.yaml --dry-run train.lr=1`` leaves the override over: take it back.
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args))
    except UserError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
