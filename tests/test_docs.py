"""The README and docs/ as a new user meets them: every link leads somewhere, and every Python example runs as written
after the quick starts (here on tiny models trained by the test in the quick starts' folders)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_DIGITS, run_script

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "RESULTS.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
NOT_RUN = "# not run by the tests:"  # first line of an example that needs what a test cannot have (the Hub)


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_and_anchor_leads_somewhere():
    checked = 0
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue  # the web is out of reach offline
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.relative_to(REPO)} links to {target}, which does not exist"
            if anchor:
                assert anchor in heading_anchors(linked), f"{page.relative_to(REPO)}: no heading for #{anchor}"
            checked += 1
    assert checked > 40


def test_the_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    documented = {Path(target).name for target in LINK.findall("\n".join(lines)) if target.startswith("docs/")}
    assert documented >= {page.name for page in (REPO / "docs").glob("*.md")}  # every page reachable from it


def examples() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for i, block in enumerate(PYTHON_BLOCK.findall(page.read_text())):
            if not block.startswith(NOT_RUN):
                found.append((f"{page.relative_to(REPO)}#{i}", block))
    return found


# Runs each example in a namespace of its own, so an example that leans on another's names fails here.
RUNNER = """
import json, sys, traceback
results = {}
for name, code in json.load(open(sys.argv[1])):
    try:
        exec(compile(code, name, "exec"), {"__name__": "__main__"})
        results[name] = None
    except BaseException:
        results[name] = traceback.format_exc()
json.dump(results, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def quick_starts(tmp_path_factory) -> Path:
    """A folder where both quick starts have run (tiny versions): lightning_logs/digits and digits_cond."""
    folder = tmp_path_factory.mktemp("user")
    for config in ("digits.yaml", "digits_cond.yaml"):
        args = [*TINY_DIGITS, "--config", config, "--trainer.max_epochs", "1", "--sample_grids.samplers", "[]",
                "--sample_quality.num_images", "0"]
        result = run_script("train.py", "fit", *args, cwd=folder)
        assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_every_python_example_runs_as_written(quick_starts):
    cases = examples()
    assert len(cases) >= 10
    (quick_starts / "examples.json").write_text(json.dumps(cases))
    (quick_starts / "runner.py").write_text(RUNNER)
    subprocess.run([sys.executable, "runner.py", "examples.json", "results.json"], cwd=quick_starts, check=True,
                   timeout=600)
    results = json.loads((quick_starts / "results.json").read_text())
    failures = {name: error for name, error in results.items() if error}
    assert not failures, "\n\n".join(f"{name}:\n{error}" for name, error in failures.items())
    assert sorted(results) == sorted(name for name, _ in cases)
