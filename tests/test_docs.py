"""The README and docs/: short enough to read, their links resolve, and the repository's
text describes the product, not the history of its making."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO

README_MAX_LINES = 200

# Process words: the text says what the product does, not when or in which work item it
# changed. Whitespace is any run of blanks or one line break, so a phrase wrapped over two
# lines is found too. Literature years alone ("Larrue et al. 2011") are fine; ISO dates
# (2026-11, 2026-11-03) are not. A year range (2004-2007) is not a date.
_GAP = r"\s+"
HISTORY_WORDS: dict[str, re.Pattern[str]] = {
    "stop N": re.compile(rf"\bstop{_GAP}#?\d+", re.I),
    "issue N": re.compile(rf"\bissue{_GAP}#?\d+", re.I),
    "blocked": re.compile(r"\bblocked\b", re.I),
    "until <year>": re.compile(rf"\buntil{_GAP}20\d\d\b", re.I),
    "since <year>": re.compile(rf"\bsince{_GAP}20\d\d\b", re.I),
    "ISO date": re.compile(r"(?<![\w.-])20\d\d-(?:0[1-9]|1[0-2])(?:-(?:0[1-9]|[12]\d|3[01]))?\b"),
    "not adopted": re.compile(rf"\bnot{_GAP}adopted\b", re.I),
}


# Matches that are data, not history: (file, matching text) -> why.
NOT_HISTORY: dict[tuple[str, str], str] = {
    ("src/bonedamage/learn/study.py", "2000-01-01"): "the fixed epoch of the exported journal",
}


def checked_files() -> list[Path]:
    """The text a user or a developer reads: README, docs, params, the pipeline, the code."""
    files = [REPO / "README.md", REPO / "params.yaml", REPO / "dvc.yaml", REPO / "MLproject"]
    files += sorted((REPO / "docs").rglob("*.md"))
    files += sorted((REPO / "src").rglob("*.py"))
    return [path for path in files if path.is_file()]


def history_hits(text: str) -> list[tuple[int, str, str]]:
    """(line number, kind, matching text) of every process word in ``text``."""
    hits = []
    for kind, pattern in HISTORY_WORDS.items():
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            hits.append((line, kind, " ".join(match.group().split())))
    return sorted(hits)


def test_repository_text_does_not_narrate_its_own_history() -> None:
    files = checked_files()
    assert REPO / "README.md" in files and len(files) > 20  # the check is not vacuous
    found = [
        f"{path.relative_to(REPO)}:{line}: {text!r} ({kind})"
        for path in files
        for line, kind, text in history_hits(path.read_text(encoding="utf-8"))
        if (str(path.relative_to(REPO)), text) not in NOT_HISTORY
    ]
    assert not found, "process words in the repository's text:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "text",
    [
        "the default since stop 26",
        "trained channels-last (stop\n27)",
        "see issue #12 for the details",
        "Issue 7 asks for it",
        "the ImageNet weights are blocked offline",
        "the default until 2026-11",
        "since 2025 the gate runs",
        "measured on 2026-03-14",
        "measured and not\nadopted",
        "Neither is adopted; the other was not adopted.",
    ],
)
def test_the_history_check_flags_process_words(text: str) -> None:
    assert history_hits(text) != []


@pytest.mark.parametrize(
    "text",
    [
        "Larrue et al., PLoS ONE 6 (2011) e21297",
        "Perilli et al. 2007; Nazarian et al. 2006",
        "bovine 1.3-2.0 (2004-2007 studies)",
        "seed: 20210814",
        "early stopping stops 4 of 5 seeds",
        "the search stops once the study holds n_trials",
        "unblocked and adopted",
        "torch 2.14.1, resnet18-f37072fd.pth",
    ],
)
def test_the_history_check_allows_literature_years_and_ordinary_words(text: str) -> None:
    assert history_hits(text) == []


def test_readme_fits_in_200_lines() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, at most {README_MAX_LINES}: move details to docs/"
    )


# [text](target) and [text](target "title"); images too. Code is left out: a link in a
# code block or span is an example, not a link.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def relative_links(text: str) -> list[tuple[int, str]]:
    """(line number, target without its #anchor) of every relative link in Markdown."""
    blanked = FENCE.sub(lambda m: "\n" * m.group().count("\n"), text)
    blanked = CODE_SPAN.sub(lambda m: " " * len(m.group()), blanked)
    links = []
    for match in LINK.finditer(blanked):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http:, https:, mailto:, ... and anchors within the page
        line = blanked.count("\n", 0, match.start()) + 1
        links.append((line, target.split("#", 1)[0]))
    return links


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_every_relative_link_in_readme_and_docs_points_to_an_existing_file() -> None:
    broken = []
    count = 0
    for path in markdown_files():
        for line, target in relative_links(path.read_text(encoding="utf-8")):
            count += 1
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(REPO)}:{line}: {target}")
    assert count > 10  # the check is not vacuous
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_the_link_check_reads_markdown_links_but_not_code() -> None:
    text = (
        'See [the phantoms](docs/phantoms.md#limits) and ![plot](plots/a.png "a plot").\n'
        "Not [web](https://example.org) nor [here](#results).\n"
        "`[code](no.md)`\n"
        "```markdown\n[example](missing.md)\n```\n"
        "[last](docs/results.md)\n"
    )
    assert relative_links(text) == [
        (1, "docs/phantoms.md"),
        (1, "plots/a.png"),
        (7, "docs/results.md"),
    ]


def test_the_docs_pages_are_linked_from_the_readme() -> None:
    """A newcomer finds every page of docs/ from the README."""
    linked = {
        (REPO / target).resolve()
        for _, target in relative_links((REPO / "README.md").read_text(encoding="utf-8"))
    }
    pages = sorted((REPO / "docs").glob("*.md"))
    assert pages
    missing = [str(page.relative_to(REPO)) for page in pages if page.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"
