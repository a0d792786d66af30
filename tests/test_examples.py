"""The documentation's Python examples are files under examples/ that this fast test runs, and the
README and docs/ pages show them verbatim: a fenced python block right after a line
``<!-- example: examples/NAME.py -->`` must equal that file. Also: the README fits one screen of
250 lines, and the docs' relative links lead to files (and headings) that exist."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::dagster.BetaWarning", "ignore::dagster.PreviewWarning")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED_PAGES = [*PAGES, *sorted((ROOT / "docs").glob("*/README.md")), *sorted((ROOT / "docs").glob("*/*/README.md"))]
MARKER = re.compile(r"^<!-- example: (?P<path>\S+) -->$")
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """The heading anchors of a markdown page, as GitHub makes them."""
    found: set[str] = set()
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def example_blocks(page: Path) -> list[tuple[int, str, str]]:
    """(line number, example path, the fenced block's content) for every marker of the page."""
    lines = page.read_text().splitlines()
    found = []
    for number, line in enumerate(lines):
        match = MARKER.match(line.strip())
        if not match:
            continue
        where = f"{page.name}:{number + 1}"
        assert number + 1 < len(lines) and lines[number + 1] == "```python", f"{where}: no ```python block follows"
        end = next((i for i in range(number + 2, len(lines)) if lines[i] == "```"), None)
        assert end is not None, f"{where}: the python block is not closed"
        found.append((number + 1, match["path"], "".join(f"{text}\n" for text in lines[number + 2 : end])))
    return found


def test_there_are_examples():
    assert EXAMPLES, "no examples/*.py"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_example_runs(example, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(example))
    # Every pipeline an example builds is one Dagster definitions would take: a hub id as
    # model_source is fine, a local model folder that does not exist would be refused here.
    from llm_assets import LLMPipeline
    from llm_assets.defs.factory import build_definitions
    from llm_assets.resources import PartitionStorage, make_resources

    pipelines = [value for value in namespace.values() if isinstance(value, LLMPipeline)]
    if pipelines:
        build_definitions(pipelines, resources=make_resources(PartitionStorage(root=str(tmp_path / "storage"))))


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_examples_in_the_page_are_the_files(page):
    for line, path, block in example_blocks(page):
        example = ROOT / path
        assert example.is_file(), f"{page.name}:{line}: {path} does not exist"
        assert block == example.read_text(), f"{page.name}:{line}: the block differs from {path}"


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_python_block_is_an_example(page):
    lines = page.read_text().splitlines()
    loose = [
        n + 1 for n, line in enumerate(lines) if line == "```python" and (n == 0 or not MARKER.match(lines[n - 1]))
    ]
    assert loose == [], f"{page.name}: python blocks without an example marker at lines {loose}"


def test_every_example_is_shown():
    shown = {path for page in PAGES for _, path, _ in example_blocks(page)}
    unshown = [example.relative_to(ROOT).as_posix() for example in EXAMPLES]
    assert [path for path in unshown if path not in shown] == []


def test_readme_fits_one_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines"


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for match in LINK.finditer(text):
        target, _, anchor = match["target"].partition("#")
        if re.match(r"^[a-z]+:", target):
            continue
        path = (page.parent / target) if target else page
        if not path.exists():
            broken.append(match["target"])
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(match["target"])
    assert broken == [], f"{page.relative_to(ROOT)}: broken links {broken}"
