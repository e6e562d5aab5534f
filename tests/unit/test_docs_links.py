"""The docs point at things that exist: every repository path README.md and docs/*.md name in
backticks, and every relative link they hold (its #anchor included), resolves in this checkout.

Code moves; a doc that still names the old place misleads a reader more than one that names
none. A failure here says which document, which path, and what to do about it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Something written like a path: words, dots and dashes, separated by slashes. URLs (`://`),
#: API routes (a leading `/`), commands (spaces) and placeholders (`$`, `<`, `{`) never match.
PATH_LIKE = re.compile(r"\.?[A-Za-z0-9_][\w.-]*(/[\w.-]+)*/?")
#: A name without a slash is a file of the repository only when it ends like one of its files.
FILE_ENDINGS = (".py", ".md", ".toml", ".yml", ".yaml", ".json", ".ini", ".cfg", ".example")
#: Files a user or a pipeline creates, named in the docs but never part of the repository.
NOT_IN_REPOSITORY = frozenset(
    {"main.py", "pipeline.json", "prices.toml", "requirements.txt", ".env", "flower.db"}
)

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def prose(text: str) -> str:
    """The document without its fenced blocks: commands and sample output are not references."""
    return FENCE.sub("", text)


def named_paths(text: str) -> set[str]:
    """Repository paths named in code spans, as written (relative to the repository root)."""
    found = set()
    for _, written in CODE_SPAN.findall(prose(text)):
        span = written.strip()
        if not PATH_LIKE.fullmatch(span) or span in NOT_IN_REPOSITORY:
            continue
        if "/" in span or span.endswith(FILE_ENDINGS):
            found.add(span)
    return found


def relative_links(text: str) -> set[str]:
    """Link and image targets that are neither absolute URLs nor mail addresses."""
    targets = {m.group(1) for m in LINK.finditer(prose(text))}
    return {t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)}


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, code and punctuation dropped, spaces to `-`."""
    plain = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", plain).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {anchor(h) for h in HEADING.findall(prose(doc.read_text()))}


def label(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=label)
def test_every_path_a_doc_names_exists(doc: Path) -> None:
    missing = sorted(p for p in named_paths(doc.read_text()) if not (ROOT / p).exists())
    assert not missing, (
        f"{label(doc)} names paths this checkout does not have: {missing}; point them at where "
        "the code is now (or name the package, e.g. `domain/runs/`)"
    )


@pytest.mark.parametrize("doc", DOCS, ids=label)
def test_every_relative_link_in_a_doc_resolves(doc: Path) -> None:
    broken = []
    for target in sorted(relative_links(doc.read_text())):
        path, _, fragment = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target} (no heading with that anchor in {label(file)})")
    assert not broken, f"{label(doc)} has links that lead nowhere: {broken}"


def test_the_checks_see_what_a_doc_holds() -> None:
    """The extraction itself: what counts as a path, a link and an anchor."""
    text = (
        "See `domain/runs/`, `bench/RESULTS.md`, `.env.example` and `worker/executor.py`; not\n"
        "`conveyor.submit`, `main.py`, `/api/v1/runs`, `redis://127.0.0.1:6379/0`, `a b/c`,\n"
        "`$HOME/envs`. [results](bench/RESULTS.md#2026), [webhooks](#webhooks),\n"
        "[site](https://example.org/x), ![logo](docs/logo.png).\n"
        "```bash\ncat `docs/in-a-block.md` && open [x](nowhere.md)\n```\n"
    )
    assert named_paths(text) == {
        "domain/runs/",
        "bench/RESULTS.md",
        ".env.example",
        "worker/executor.py",
    }
    assert relative_links(text) == {"bench/RESULTS.md#2026", "#webhooks", "docs/logo.png"}
    assert anchor("Running it for real") == "running-it-for-real"
    assert anchor("`conveyor dev`: one process") == "conveyor-dev-one-process"
    assert anchor("2026-11-24, 21:17-22:59 (evening)") == "2026-11-24-2117-2259-evening"
