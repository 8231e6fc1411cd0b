"""The ``scilm`` command: parse, validate, hand a job object to an executor.

Exit status: 0 on success, 2 for any user mistake (bad config, bad corpus, bad
shards, missing model), printed one line per problem; 3 when the filesystem
refused a write (disk full, quota, permission, read-only), naming the path; 4
when a local job's ranks were ended by their hang watchdog (``runtime.watchdog``;
``scilm resume`` continues); 1 for anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scilm_hpc.config import load_and_validate, load_config, resolve, to_yaml, validate
from scilm_hpc.errors import STORAGE_ERRNOS, ConfigError, StorageError, UserError, storage_error
from scilm_hpc.rundir import config_file, write_text_atomic
from scilm_hpc.runtime.watchdog import HANG_EXIT_CODE, HangError
from scilm_hpc.schema import JobConfig

EXIT_USER_ERROR = 2
EXIT_STORAGE_ERROR = 3


def _save_config(job: JobConfig) -> None:
    Path(job.run.dir).mkdir(parents=True, exist_ok=True)
    write_text_atomic(config_file(job.run.dir, job.job), to_yaml(job))


def _check_before_submit(job: JobConfig, problems: list[str] | None = None) -> None:
    """Refuse, before anything is written or queued, a busy run directory, a changed
    config on a used one, and missing or unfit inputs: every problem at once, after
    ``problems`` (the config's own)."""
    from scilm_hpc.jobs.presubmit import submission_problems
    from scilm_hpc.runtime.ownership import refuse_if_busy

    problems = list(problems or [])
    try:
        refuse_if_busy(Path(job.run.dir), job.job)
    except UserError as exc:
        problems += exc.problems
    problems += submission_problems(job)
    if problems:
        raise UserError(problems)


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
    from scilm_hpc.train.checkpoint import find_resume_tag

    config = Path(args.run_dir) / "config.yaml"
    if not config.is_file():
        raise UserError(f"{args.run_dir}: no config.yaml; not a finetune run directory")
    # sizes only here: the job verifies checksums (and may fall back further) on its ranks
    tag, _ = find_resume_tag(args.run_dir, verify_checksums=False)
    if tag is None:
        raise UserError(f"{args.run_dir}: no checkpoint to resume from (checkpoints/ is empty)")
    print(
        f"resuming {args.run_dir} from {tag} (or the newest checkpoint that verifies)", flush=True
    )
    args.job_file, args.command, args.dry_run, args.sweep = config, "finetune", False, []
    args.wait = False
    # the saved run.allow_config_change does not carry over: only this command's does
    args.overrides = ["run.allow_config_change=false", *args.overrides, f"run.dir={args.run_dir}"]
    return cmd_job(args)


def _print_sbatch(job: JobConfig, array: int = 0) -> None:
    """For a Slurm profile: the exact sbatch script (of a job array of ``array``)."""
    if job.cluster.backend != "slurm":
        return
    from scilm_hpc.launch.executor import submitit_folder
    from scilm_hpc.launch.sbatch import sbatch_script

    print("# ---- sbatch script (not submitted) ----")
    print(sbatch_script(job, submitit_folder(job), array=array), end="")


def cmd_job(args: argparse.Namespace) -> int:
    """``scilm prepare|... JOB.yaml [key=value ...]``."""
    from scilm_hpc.launch.executor import run_job

    if args.quiet:
        from scilm_hpc.train.progress import QUIET_ENV

        os.environ[QUIET_ENV] = "1"  # inherited by the local and Slurm ranks
    if args.sweep:
        return _sweep(args)
    from scilm_hpc.jobs.presubmit import CHECKED_JOBS

    checked = args.command in CHECKED_JOBS  # their inputs are checked with the rest below
    job = resolve(load_config(args.job_file, args.overrides, args.command))
    problems = validate(job, inputs=not checked)
    if args.dry_run or not checked:
        if problems:
            raise ConfigError(problems)
    if args.dry_run:
        print(to_yaml(job), end="")
        _print_sbatch(job)
        _note_refusals(job)
        return 0
    _check_before_submit(job, problems)  # before config.yaml is rewritten
    _save_config(job)
    result = run_job(JOB_FACTORIES[args.command](job), job, wait=args.wait)
    print(json.dumps(result, indent=1))
    return 0


def _note_refusals(job: JobConfig) -> None:
    """A dry run shows (on stderr) what would refuse the real submission."""
    from scilm_hpc.jobs.presubmit import submission_problems

    for line in submission_problems(job):
        print(f"note: a submission would be refused: {line}", file=sys.stderr)


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
    problems: list[str] = []
    for job in jobs:
        try:
            _check_before_submit(job)
        except UserError as exc:
            problems += [p for p in exc.problems if p not in problems]
    if problems:
        raise UserError(problems)
    write_sweep_index(Path(parent.run.dir), members)
    for job in jobs:
        _save_config(job)
    results = run_jobs([JOB_FACTORIES[args.command](j) for j in jobs], jobs, parent, wait=args.wait)
    print(json.dumps(results, indent=1))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """``scilm status RUN_DIR``: job ids and states, step, last checkpoint, last metrics."""
    from scilm_hpc.runtime.status import run_status

    print(json.dumps(run_status(Path(args.run_dir)), indent=1))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """``scilm cancel RUN_DIR``: cancel the run's Slurm jobs that are still queued or running."""
    from scilm_hpc.runtime.status import cancel_run

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


def _validate_checkpoints(args: argparse.Namespace) -> int:
    """``scilm validate RUN_DIR --checkpoints``: one line per checkpoint; 1 if any is bad."""
    from scilm_hpc.train.checkpoint import verify_run_checkpoints

    if args.overrides or args.data:
        raise UserError("--checkpoints takes a run directory alone (no key=value, no --data)")
    report = verify_run_checkpoints(args.job_file)
    for name, verdict, detail in report:
        print(f"{name}: {verdict}: {detail}")
    bad = sum(verdict == "bad" for _, verdict, _ in report)
    print(f"{args.job_file}: {len(report) - bad} of {len(report)} checkpoint(s) usable")
    return 1 if bad else 0


def cmd_validate(args: argparse.Namespace) -> int:
    """``scilm validate JOB.yaml [key=value ...] [--data]``: check, submit nothing;
    ``scilm validate RUN_DIR --checkpoints``: verify a run's checkpoints."""
    if args.checkpoints:
        return _validate_checkpoints(args)
    if Path(args.job_file).is_dir():
        raise UserError(
            f"{args.job_file}: a directory; give a job file, or add --checkpoints to verify "
            f"the checkpoints of this run directory"
        )
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


def cmd_list(args: argparse.Namespace) -> int:
    """``scilm list``: the shipped jobs, cluster profiles and compress recipes."""
    from scilm_hpc.catalog import format_catalog

    print(format_catalog(), end="")
    return 0


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress lines or bar (also: environment SCILM_QUIET=1)",
    )


#: What each job does and one example, for ``scilm KIND --help``.
JOB_HELP = {
    "prepare": (
        "tokenize a raw corpus (JSONL, CSV, CoNLL or plain text) into HDF5 shards",
        "scilm prepare jobs/prepare.yaml data.train=corpus/train.jsonl run.dir=runs/demo",
    ),
    "finetune": (
        "fine-tune a pretrained model on prepared shards (DeepSpeed, one or more ranks)",
        "scilm finetune jobs/finetune.yaml data.shards=runs/demo/shards run.dir=runs/ft",
    ),
    "compress": (
        "prune and/or quantise a fine-tuned model and report size, speed and metrics",
        "scilm compress jobs/compress.yaml model.name_or_path=runs/ft/export "
        "data.shards=runs/demo/shards run.dir=runs/ft/compress compress=int8-dynamic",
    ),
    "evaluate": (
        "score a model (fine-tuned or compressed) on a split of prepared shards",
        "scilm evaluate jobs/evaluate.yaml model.name_or_path=runs/ft/export "
        "data.shards=runs/demo/shards run.dir=runs/ft/eval",
    ),
}
OVERRIDES_HELP = (
    "settings that replace the job file's, as key=value (e.g. train.lr=3e-5 cluster=dev "
    "cluster.nodes=2); choose a cluster profile or compress recipe by name (see scilm list)"
)
RUN_DIR_HELP = "the run directory (run.dir of the job), e.g. runs/ft"


def _sub(sub: Any, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    from scilm_hpc import __version__

    parser = argparse.ArgumentParser(
        prog="scilm",
        description=(
            "Prepare a scientific corpus, fine-tune a language model on it, compress and\n"
            "evaluate the result: on this machine or on a Slurm cluster."
        ),
        epilog=(
            "examples:\n"
            "  scilm list                          jobs, cluster profiles, compress recipes\n"
            "  scilm finetune jobs/finetune.yaml data.shards=runs/demo/shards run.dir=runs/ft\n"
            "  scilm finetune jobs/finetune.yaml cluster=dev run.dir=runs/ft --dry-run\n"
            "  scilm status runs/ft\n"
            "\nscilm COMMAND --help shows each command's arguments and an example."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"scilm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, example) in JOB_HELP.items():
        p = _sub(sub, name, summary, example)
        p.add_argument("job_file", help="the job file (YAML), e.g. one of jobs/ (see scilm list)")
        p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
        p.add_argument(
            "--dry-run",
            action="store_true",
            help="print the resolved config (and for Slurm the sbatch script); run nothing",
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
        _add_quiet(p)
        p.set_defaults(func=cmd_job)
    p = _sub(
        sub, "list", "list the shipped jobs, cluster profiles and compress recipes", "scilm list"
    )
    p.set_defaults(func=cmd_list)
    p = _sub(
        sub,
        "status",
        "show a run's job ids, state, step, last checkpoint and last metrics",
        "scilm status runs/ft",
    )
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.set_defaults(func=cmd_status)
    p = _sub(
        sub,
        "cancel",
        "cancel a run's Slurm jobs that are queued or running",
        "scilm cancel runs/ft",
    )
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.set_defaults(func=cmd_cancel)
    p = _sub(
        sub,
        "resume",
        "run a finetune again from its latest complete checkpoint",
        "scilm resume runs/ft cluster.time_min=120",
    )
    p.add_argument("run_dir", help="the finetune's run directory (holds config.yaml)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value settings that replace the saved config's (e.g. cluster.time_min=120)",
    )
    _add_quiet(p)
    p.set_defaults(func=cmd_resume)
    p = _sub(
        sub,
        "export",
        "write RUN_DIR/export (a Hugging Face model directory) from a finetune checkpoint",
        "scilm export runs/ft --tag step_200",
    )
    p.add_argument("run_dir", help="the finetune's run directory")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_200 (default: latest)")
    p.set_defaults(func=cmd_export)
    p = _sub(
        sub,
        "import-model",
        "write a model shipped inside a PyPI package as a model directory the jobs accept",
        "scilm import-model antiberty models/antiberty",
    )
    p.add_argument("name", help="antiberty (pip install --no-deps antiberty==0.1.3)")
    p.add_argument("out_dir", help="the directory to write (must not exist)")
    p.set_defaults(func=cmd_import_model)
    p = _sub(
        sub,
        "validate",
        "check a job file and its settings, run nothing (with --data also its shards); "
        "or verify a run's checkpoints",
        "scilm validate jobs/finetune.yaml run.dir=runs/ft data.shards=runs/demo/shards --data\n"
        "  scilm validate runs/ft --checkpoints",
    )
    p.add_argument("job_file", help="the job file (YAML); with --checkpoints the run directory")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument(
        "--data",
        action="store_true",
        help="also verify data.shards: checksums and tokenizer fingerprint",
    )
    p.add_argument(
        "--checkpoints",
        action="store_true",
        help="give a run directory instead of a job file: verify each of its checkpoints "
        "against its manifest (exit 1 if any is bad)",
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
    except HangError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return HANG_EXIT_CODE
    except (StorageError, OSError) as exc:
        if isinstance(exc, OSError):
            if exc.errno not in STORAGE_ERRNOS:
                raise
            exc = storage_error(exc)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STORAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
