"""The documentation: the mkdocs site builds in strict mode (every internal link and anchor resolves,
every `::: module.name` of the API reference is found), the README stays short and names the two
commands, README links into docs/ land on pages and headings that exist, and no user-facing text
carries development notes."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# Development notes that do not belong in text users read: machines by letter, issue talk, session talk.
NOTES = re.compile(r"machine [ABC]\b|the issue'?s? target|\bthe issue\b|no GPU was lent|this session|closing note",
                   re.IGNORECASE)


def user_text() -> dict[Path, str]:
    files = [README, ROOT / "mkdocs.yml", *sorted(DOCS.rglob("*.md"))]
    return {f: f.read_text(encoding="utf-8") for f in files}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def test_site_builds_strictly(site):
    assert (site / "index.html").exists()
    assert (site / "reference" / "training" / "index.html").exists()
    assert "TrainConfig" in (site / "reference" / "training" / "index.html").read_text(encoding="utf-8")


def test_readme_is_short_and_names_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250, "README.md: install, the two commands, a quick start and links; the rest goes in docs/"
    assert "make demo" in text
    assert "make test" in text


def test_no_development_notes_in_user_text():
    found = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
             for path, text in user_text().items() for m in NOTES.finditer(text)]
    assert not found, "development notes in user-facing text:\n" + "\n".join(found)


def test_readme_links_into_docs_resolve(site):
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)\s]+)\)", text)
    assert links, "README.md links to no docs page"
    for link in links:
        page, _, anchor = link.partition("#")
        assert (ROOT / page).is_file(), f"README.md links to {page}, which does not exist"
        html = site / Path(page).relative_to("docs").with_suffix("") / "index.html"
        if html.name == "index.html" and html.parent.name == "index":   # docs/index.md is the site's root
            html = html.parent.parent / "index.html"
        if anchor:
            assert f'id="{anchor}"' in html.read_text(encoding="utf-8"), f"README.md: {link}: no such heading"


def test_api_reference_members_exist():
    # mkdocstrings fails the strict build on a `::: name` it cannot find, but skips a name in a
    # `members: [...]` list silently: check those here.
    listed = []
    for page in sorted((DOCS / "reference").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for module, members in re.findall(r"^::: ([\w.]+)\n    options:\n      members: \[([^\]]*)\]", text, re.M):
            listed += [(page.name, module, name.strip()) for name in members.split(",") if name.strip()]
    assert listed
    missing = [f"{page}: {module}.{name}" for page, module, name in listed
               if not hasattr(importlib.import_module(module), name)]
    assert not missing, "API reference lists names that do not exist:\n" + "\n".join(missing)


def test_the_python_api_screen_runs_as_written(tmp_path, monkeypatch):
    """getting-started's "Python API in one screen", up to its training lines (those train for minutes)."""
    text = (ROOT / "docs" / "getting-started.md").read_text()
    start = text.index("```python", text.index("## The Python API in one screen")) + len("```python")
    code = text[start:text.index("```", start)]
    monkeypatch.chdir(tmp_path)
    exec(compile(code[:code.index("# training, evaluation, checkpoints")], "getting-started.md", "exec"), {})


def test_the_planner_line_quoted_in_distributed_md_is_what_plan_prints(capsys):
    """The sequence-parallel line the docs quote comes from the command they name beside it."""
    from pixformer.cli import main
    text = " ".join((DOCS / "distributed.md").read_text(encoding="utf-8").split())
    quoted = re.search(r"`(sequence parallel P=2: keys/values [^`]+)`", text).group(1)
    command = re.search(r"`pixformer (plan --model pit-t [^`]+)`", text).group(1).split()
    assert main(command) == 0
    assert quoted == capsys.readouterr().out.strip().splitlines()[-1]
