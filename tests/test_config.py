"""The config schema, loader and ``scilm validate``: every user mistake is reported
with its full dotted key and what is allowed, all at once, with exit status 2."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from scilm_hpc.config import load_and_validate, load_config, resolve, validate
from scilm_hpc.errors import ConfigError, UserError
from tests.conftest import REPO, scilm_run

Scilm = Callable[..., tuple[int, str, str]]

JOB_FILES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "jobs").rglob("*.y*ml"))
CONFIG_BLOCKS = sorted(
    p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").glob("*/*.yaml")
)
#: The task each data format feeds (``config.validate`` refuses other pairs).
FORMAT_TASK = {
    "jsonl": "classification",
    "csv": "classification",
    "conll": "token_classification",
    "text": "causal_lm",
}


@pytest.fixture
def corpus(write_jsonl: Callable[..., Path]) -> Path:
    """A tiny JSONL corpus, so that prepare jobs have an existing ``data.train``."""
    return write_jsonl(
        "train.jsonl", [{"text": "a cell", "label": "x"}, {"text": "a gene", "label": "y"}]
    )


@pytest.fixture
def job_file(tmp_path: Path, corpus: Path) -> Path:
    """A complete, valid prepare job that runs in this process."""
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "job": "prepare",
                "defaults": ["data/jsonl-classification", "cluster/local"],
                "task": "classification",
                "run": {"dir": str(tmp_path / "run")},
                "data": {"train": str(corpus)},
            }
        ),
        encoding="utf-8",
    )
    return path


def errors(err: str) -> list[str]:
    """The ``error:`` lines scilm printed on stderr."""
    return [line for line in err.splitlines() if line.startswith("error: ")]


def test_valid_job_passes(scilm: Scilm, job_file: Path, tmp_path: Path) -> None:
    code, out, err = scilm("validate", job_file)
    assert (code, err) == (0, "")
    assert f"valid prepare job (run.dir={tmp_path / 'run'})" in out
    assert not (tmp_path / "run").exists()  # validate writes nothing


# --- one problem at a time --------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "train.lrr=1",
            [
                "train.lrr: unknown key",
                "did you mean 'train.lr'?",
                "allowed keys here:",
                "command line",
            ],
        ),
        (
            "data.split.dev_ration=0.1",
            ["data.split.dev_ration: unknown key", "did you mean 'data.split.dev_ratio'?"],
        ),
        ("trian.lr=1", ["trian: unknown key", "did you mean 'train'?"]),
        ("train.lr=abc", ["train.lr: expected a number, got 'abc'"]),
        ("train.epochs=1.5", ["train.epochs: expected an integer"]),
        ("data.overwrite=maybe", ["data.overwrite: expected true or false"]),
        ("zero.stage=4", ["zero.stage: got 4; allowed: 0, 1, 2, 3"]),
        ("task=foo", ["task: got 'foo'; allowed: classification, token_classification, causal_lm"]),
        ("data.format=xml", ["data.format: got 'xml'; allowed: jsonl, csv, conll, fasta, text"]),
        ("train.lr=-1", ["train.lr: got -1.0; must be >= 0"]),
        ("data.split.dev_ratio=-0.1", ["data.split.dev_ratio: got -0.1; allowed: 0 <= ratio < 1"]),
        ("data.dev=/nonexistent/dev.jsonl", ["data.dev: file '/nonexistent/dev.jsonl' does not"]),
        ("data.format=conll", ["data.format: 'conll' cannot feed task 'classification'"]),
        ("noequals", ["'noequals': an override must look like key=value"]),
        ("=5", ["'=5': an override must look like key=value"]),
        (
            "cluster=nosuch",
            [
                "cluster: no building block 'nosuch' in configs/cluster/",
                "allowed: dev, local, none, site-example",
            ],
        ),
        (
            "zero.stage=2 zero.offload_params=true",
            ["zero.offload_params: parameter offload needs zero.stage=3, got zero.stage=2"],
        ),
    ],
)
def test_one_bad_override(
    scilm: Scilm, job_file: Path, tmp_path: Path, override: str, expected: list[str]
) -> None:
    code, out, err = scilm("validate", job_file, *override.split())
    assert code == 2
    lines = errors(err)
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0]
    assert out == ""
    assert not (tmp_path / "run").exists()


def test_time_limit_signal_must_leave_time_to_start(scilm: Scilm, job_file: Path) -> None:
    # USR2 5 s into a 1-minute job would arrive before Python has installed the handler
    code, _, err = scilm(
        "validate", job_file, "cluster=dev", "cluster.time_min=1", "cluster.signal_delay_s=55"
    )
    assert code == 2
    (line,) = errors(err)
    assert "cluster.signal_delay_s: 55 s before a 1-minute limit" in line
    assert "less than 10 s after it starts" in line
    ok = ("cluster=dev", "cluster.time_min=1", "cluster.signal_delay_s=50")
    assert scilm("validate", job_file, *ok)[0] == 0
    # without Slurm nothing sends the signal: no limit on the delay
    assert scilm("validate", job_file, "cluster=local", "cluster.signal_delay_s=600")[0] == 0


def test_unknown_key_in_job_file_names_file(scilm: Scilm, job_file: Path) -> None:
    body = yaml.safe_load(job_file.read_text(encoding="utf-8"))
    body["data"]["max_lenght"] = 64
    job_file.write_text(yaml.safe_dump(body), encoding="utf-8")
    code, _, err = scilm("validate", job_file)
    assert code == 2
    (line,) = errors(err)
    assert "data.max_lenght: unknown key (did you mean 'data.max_length'?)" in line
    assert str(job_file) in line


def test_every_problem_reported_at_once(scilm: Scilm, job_file: Path) -> None:
    code, _, err = scilm(
        "validate",
        job_file,
        "train.lrr=1",
        "train.lr=abc",
        "noequals",
        "cluster=nosuch",
        "zero.stag=3",
        "data.max_length=x",
    )
    assert code == 2
    lines = errors(err)
    assert len(lines) == 6, err
    for key in (
        "train.lrr:",
        "train.lr:",
        "'noequals'",
        "cluster:",
        "zero.stag:",
        "data.max_length:",
    ):
        assert sum(key in line for line in lines) == 1, (key, lines)


def test_every_validation_problem_reported_at_once(scilm: Scilm, job_file: Path) -> None:
    code, _, err = scilm(
        "validate",
        job_file,
        "zero.stage=4",
        "task=foo",
        "data.format=xml",
        "model.name_or_path=/nonexistent/x",
        "cluster.nodes=0",
    )
    assert code == 2
    lines = errors(err)
    assert len(lines) == 5, err
    for key in ("zero.stage:", "task:", "data.format:", "model.name_or_path:", "cluster.nodes:"):
        assert sum(line.startswith(f"error: {key}") for line in lines) == 1, (key, lines)


def test_missing_required_value_without_job_file(corpus: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_and_validate(None, [f"data.train={corpus}"])
    # data.shards interpolates ${run.dir}: only the literal missing key is reported.
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("run.dir: required value is missing")
    assert "run.dir=..." in info.value.problems[0]
    job = load_and_validate(None, [f"data.train={corpus}", "run.dir=/tmp/r"])
    assert job.data.shards == "/tmp/r/shards"


def test_missing_required_value_in_job_file(scilm: Scilm, tmp_path: Path, corpus: Path) -> None:
    path = tmp_path / "norun.yaml"
    path.write_text(f"job: prepare\ndata:\n  train: {corpus}\n", encoding="utf-8")
    code, _, err = scilm("validate", path)
    assert code == 2
    (line,) = errors(err)
    assert line.startswith("error: run.dir: required value is missing")


def test_prepare_needs_train_file(scilm: Scilm, tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(f"job: prepare\nrun:\n  dir: {tmp_path / 'run'}\n", encoding="utf-8")
    code, _, err = scilm("validate", path)
    assert code == 2
    assert errors(err) == ["error: data.train: required for prepare: the training corpus file"]


# --- precedence and groups --------------------------------------------------------------


def test_precedence_block_then_job_then_command_line(tmp_path: Path, corpus: Path) -> None:
    text = tmp_path / "docs.txt"
    text.write_text("one document\n", encoding="utf-8")
    path = tmp_path / "job.yaml"
    body = {
        "job": "prepare",
        "defaults": ["data/text-lm"],
        "task": "causal_lm",
        "run": {"dir": str(tmp_path / "run")},
        "data": {"train": str(text)},
    }
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    # configs/data/text-lm.yaml sets max_length 512 over the schema's 128.
    assert load_and_validate(path).data.max_length == 512
    assert load_and_validate(path).data.format == "text"
    body["data"]["max_length"] = 256
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    assert load_and_validate(path).data.max_length == 256
    assert load_and_validate(path, ["data.max_length=64"]).data.max_length == 64
    # The last override of a key wins.
    assert (
        load_and_validate(path, ["data.max_length=64", "data.max_length=32"]).data.max_length == 32
    )


def test_later_defaults_entry_wins(tmp_path: Path, corpus: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "job": "prepare",
                "defaults": ["cluster/none", "cluster/local"],
                "run": {"dir": str(tmp_path)},
                "data": {"train": str(corpus)},
            }
        ),
        encoding="utf-8",
    )
    assert load_and_validate(path).cluster.backend == "local"


def test_group_choice_replaces_job_default(job_file: Path) -> None:
    assert load_and_validate(job_file).cluster.backend == "local"
    job = load_and_validate(job_file, ["cluster=none"])
    assert job.cluster.backend == "none"
    # A key set on the command line still wins over the chosen block.
    job = load_and_validate(job_file, ["cluster=none", "cluster.nodes=2"])
    assert (job.cluster.backend, job.cluster.nodes) == ("none", 2)


def test_group_choice_may_be_a_yaml_path(job_file: Path, tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("backend: none\npartition: gpu\ntime_min: 5\n", encoding="utf-8")
    job = load_and_validate(job_file, [f"cluster={site}"])
    assert (job.cluster.backend, job.cluster.partition, job.cluster.time_min) == ("none", "gpu", 5)


def test_unknown_key_in_building_block_names_block(job_file: Path, tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("backend: none\npartitoin: gpu\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_and_validate(job_file, [f"cluster={site}"])
    (line,) = info.value.problems
    assert "cluster.partitoin: unknown key (did you mean 'cluster.partition'?)" in line
    assert str(site) in line


def test_unknown_group_choice_lists_allowed_names(job_file: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(job_file, ["cluster=nosuch"])
    (line,) = info.value.problems
    assert "'nosuch'" in line
    assert "allowed: dev, local, none, site-example" in line


def test_bad_defaults_entry(tmp_path: Path, corpus: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(f"defaults: [nogroup/x]\nrun: {{dir: {tmp_path}}}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "defaults: entry 'nogroup/x' must be 'group/name'" in info.value.problems[0]


# --- ZeRO ---------------------------------------------------------------------------------


def test_param_offload_needs_stage_3(job_file: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_and_validate(job_file, ["zero.offload_params=true", "zero.stage=2"])
    assert info.value.problems == [
        "zero.offload_params: parameter offload needs zero.stage=3, got zero.stage=2"
    ]
    job = load_and_validate(job_file, ["zero.offload_params=true", "zero.stage=3"])
    assert (job.zero.stage, job.zero.offload_params) == (3, True)


# --- job files that are not YAML or not a mapping -------------------------------------------


def test_invalid_yaml_names_file_and_line(scilm: Scilm, tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("job: prepare\nrun:\n  dir: x\ndata: {train: [a, b\n", encoding="utf-8")
    code, _, err = scilm("validate", path)
    assert code == 2
    (line,) = errors(err)
    assert line.startswith(f"error: {path}:")
    assert "not valid YAML" in line
    line_no = int(line.removeprefix(f"error: {path}:").split(":")[0])
    assert line_no >= 4


def test_tab_indented_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "tabs.yaml"
    path.write_text("job: prepare\nrun:\n\tdir: x\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].startswith(f"{path}:3: not valid YAML")


def test_job_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)


def test_missing_job_file(scilm: Scilm, tmp_path: Path) -> None:
    code, _, err = scilm("validate", tmp_path / "nope.yaml")
    assert code == 2
    assert f"'{tmp_path / 'nope.yaml'}' does not exist" in err


# --- every shipped job and building block ----------------------------------------------------


def test_shipped_files_found() -> None:
    assert "jobs/prepare.yaml" in JOB_FILES
    assert {"cluster/local.yaml", "cluster/none.yaml", "model/minilm.yaml"} <= set(CONFIG_BLOCKS)


@pytest.mark.parametrize("name", JOB_FILES)
def test_shipped_job_validates(scilm: Scilm, name: str, corpus: Path, tmp_path: Path) -> None:
    path = REPO / name
    body = yaml.safe_load(path.read_text(encoding="utf-8"))
    data = body.get("data") or {}
    # no shipped job reuses a fixed run directory: run.dir is required (docs/decisions.md)
    assert "dir" not in (body.get("run") or {}), f"{name} fixes run.dir"
    overrides = [f"run.dir={tmp_path / 'run'}"]
    # Job files name corpus paths relative to the repository root (where users run them),
    # and the worked examples name ../shared/data, which a fresh clone lacks: validate them
    # with small stand-in files of the same names (the config checks only that they exist).
    for split in ("train", "dev", "test"):
        if data.get(split):
            assert not Path(data[split]).is_absolute(), "shipped jobs must not hold host paths"
            stand_in = tmp_path / split / Path(data[split]).name
            stand_in.parent.mkdir()
            stand_in.write_bytes(corpus.read_bytes())
            overrides.append(f"data.{split}={stand_in}")
    if not data.get("train") and body.get("job", "prepare") == "prepare":
        overrides.append(f"data.train={corpus}")
    code, out, err = scilm("validate", path, *overrides)
    assert (code, err) == (0, "")
    job = load_and_validate(path, overrides)
    assert f"valid {job.job} job" in out
    assert job.job == body.get("job", "prepare")
    for split in ("train", "dev", "test"):
        if data.get(split):
            assert Path(getattr(job.data, split)).is_file()


@pytest.mark.parametrize("block", CONFIG_BLOCKS)
def test_shipped_building_block_validates(block: str, job_file: Path) -> None:
    group, name = block.removesuffix(".yaml").split("/")
    values = yaml.safe_load((REPO / "configs" / block).read_text(encoding="utf-8")) or {}
    overrides = [f"{group}={name}"]
    if group == "data":
        overrides.append(f"task={FORMAT_TASK[values.get('format', 'jsonl')]}")
    job = load_and_validate(job_file, overrides)
    section = getattr(job, group)
    for key, value in values.items():
        if not isinstance(value, dict | list):
            assert getattr(section, key) == value, f"{group}.{key}"


# --- dry run, resolved config ---------------------------------------------------------------


@pytest.mark.parametrize("option_first", [False, True])
def test_dry_run_prints_resolved_yaml_and_writes_nothing(
    scilm: Scilm, job_file: Path, tmp_path: Path, option_first: bool
) -> None:
    overrides = ["cluster=none", "data.max_length=32"]
    args = ["--dry-run", *overrides] if option_first else [*overrides, "--dry-run"]
    code, out, err = scilm("prepare", job_file, *args)
    assert (code, err) == (0, "")
    resolved = yaml.safe_load(out)
    assert resolved["job"] == "prepare"
    assert resolved["cluster"]["backend"] == "none"
    assert resolved["data"]["max_length"] == 32
    assert resolved["data"]["shards"] == f"{tmp_path / 'run'}/shards"  # interpolation resolved
    assert resolved["run"]["dir"] == str(tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "train.jsonl"]


def test_unknown_option_is_refused(job_file: Path) -> None:
    from scilm_hpc.cli import main

    with pytest.raises(SystemExit) as info:
        main(["prepare", str(job_file), "--dry-run", "--bogus"])
    assert info.value.code == 2


def test_resolved_config_round_trips(job_file: Path, tmp_path: Path) -> None:
    from scilm_hpc.config import to_yaml

    job = load_and_validate(job_file, ["train.lr=3e-5", "zero.stage=3"])
    saved = tmp_path / "resolved.yaml"
    saved.write_text(to_yaml(job), encoding="utf-8")
    again = resolve(load_config(saved))
    assert again == job
    assert validate(again) == []


# --- errors cross process boundaries intact -----------------------------------------------


@pytest.mark.parametrize("cls", [UserError, ConfigError])
def test_error_pickle_round_trip(cls: type[UserError]) -> None:
    problems = ["train.lrr: unknown key", "zero.stage: got 4; allowed: 0, 1, 2, 3"]
    copy = pickle.loads(pickle.dumps(cls(problems)))
    assert type(copy) is cls
    assert copy.problems == problems
    assert str(copy) == "\n".join(problems)
    single = pickle.loads(pickle.dumps(cls("one problem")))
    assert single.problems == ["one problem"]


def test_config_error_from_loader_pickles(job_file: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_and_validate(job_file, ["train.lrr=1", "noequals"])
    copy = pickle.loads(pickle.dumps(info.value))
    assert isinstance(copy, ConfigError)
    assert copy.problems == info.value.problems
    assert len(copy.problems) == 2


# --- the command line a new user meets ------------------------------------------------------


def test_version() -> None:
    from scilm_hpc import __version__

    done = scilm_run("--version", timeout=60)
    assert (done.returncode, done.stdout) == (0, f"scilm {__version__}\n")


def test_list_shows_jobs_profiles_and_recipes_with_descriptions(scilm: Scilm) -> None:
    from scilm_hpc.catalog import description

    code, out, err = scilm("list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    shipped = [REPO / name for name in JOB_FILES] + [
        REPO / "configs" / block
        for block in CONFIG_BLOCKS
        if block.startswith(("cluster/", "compress/"))
    ]
    for path in shipped:
        text = description(path)
        assert text, f"{path} opens without a one-line description comment"
        name = path.relative_to(REPO / "jobs").as_posix() if "jobs" in path.parts else path.stem
        assert any(line.split() and line.split()[0] == name and text in line for line in lines), (
            name
        )
    titles = [line for line in lines if line and not line.startswith(" ")]
    assert [t.split(" (")[0] for t in titles] == ["jobs", "cluster profiles", "compress recipes"]


def test_description_is_the_first_comment_sentence(tmp_path: Path) -> None:
    from scilm_hpc.catalog import description

    path = tmp_path / "x.yaml"
    path.write_text("\n# A profile to copy: a GPU partition. Use it with\n#   more\nkey: 1\n")
    assert description(path) == "A profile to copy: a GPU partition."
    path.write_text("# Generic job on shards made by `scilm prepare`:\n")
    assert description(path) == "Generic job on shards made by scilm prepare"
    path.write_text("key: 1\n# late comment\n")
    assert description(path) == ""


def test_help_is_plain_words_with_an_example_per_command() -> None:
    from scilm_hpc.cli import build_parser

    parser = build_parser()
    top = parser.format_help()
    assert "--version" in top and "examples:" in top and "`" not in top
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"prepare", "finetune", "compress", "evaluate", "list", "status", "resume"} <= set(
        commands
    )
    for name, sub in commands.items():
        text = sub.format_help()
        assert "`" not in text, name
        assert f"example:\n  scilm {name}" in text, name
        for action in sub._actions:
            assert action.help, f"scilm {name}: argument {action.dest} has no help"
