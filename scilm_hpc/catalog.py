"""What ships with scilm: the job files, cluster profiles and compression recipes,
each with the one-line description its YAML file opens with (``scilm list``)."""

from __future__ import annotations

from pathlib import Path

from scilm_hpc.config import config_root, shipped_root


def jobs_root() -> Path:
    """The directory of the ready-to-run job files (``jobs/``; see ``shipped_root``)."""
    return shipped_root() / "jobs"


def description(path: Path) -> str:
    """The first comment line of a YAML file, up to its first full stop, without a
    trailing colon; empty where the file opens without a comment."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text:
            continue
        if not text.startswith("#"):
            return ""
        text = text.lstrip("#").strip()
        head, stop, _ = text.partition(". ")
        return (head + "." if stop else text).rstrip(":").replace("`", "").strip()
    return ""


def catalog() -> list[tuple[str, list[tuple[str, str]]]]:
    """Sections of (title, [(name, description)]): jobs, cluster profiles, compress recipes."""
    jobs = jobs_root()
    sections = [
        (
            f"jobs ({jobs}/, run with: scilm KIND JOB.yaml)",
            [
                (p.relative_to(jobs).as_posix(), description(p))
                for p in sorted(jobs.rglob("*.yaml"))
            ],
        )
    ]
    for group, title in (("cluster", "cluster profiles"), ("compress", "compress recipes")):
        folder = config_root() / group
        sections.append(
            (
                f"{title} ({folder}/, choose with {group}=NAME)",
                [(p.stem, description(p)) for p in sorted(folder.glob("*.yaml"))],
            )
        )
    return sections


def format_catalog() -> str:
    """``catalog()`` as the text ``scilm list`` prints."""
    out = []
    for title, entries in catalog():
        out.append(f"{title}:")
        width = max((len(name) for name, _ in entries), default=0)
        out.extend(f"  {name:<{width}}  {text}".rstrip() for name, text in entries)
        if not entries:
            out.append("  (none)")
        out.append("")
    return "\n".join(out)
