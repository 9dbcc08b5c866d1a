"""The documentation as a product: every Python example in README.md and
docs/ runs, every ``jaxyolo`` command line in them parses with the real CLI,
every script they name exists, and the site builds strictly (a broken link,
a missing page or a docstring that does not render fails).

A Python block that must not run (it reads files a user downloads) says so
visibly on its first line: ``# not run: <why>``.  The other blocks of a page
run in order, in one fresh process whose working folder is an empty
temporary one (a page reads like a session: later blocks use earlier names).
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOT_RUN = "# not run:"


def _blocks(path: Path) -> list:
    """``[(language, first line number, code), ...]`` of the fenced blocks of ``path``."""
    out, lang, start, buf = [], None, 0, []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if lang is None and line.startswith("```") and len(line) > 3:
            lang, start, buf = line[3:].split()[0], i + 1, []
        elif lang is not None and line.rstrip() == "```":
            out.append((lang, start, "\n".join(buf) + "\n"))
            lang = None
        elif lang is not None:
            buf.append(line)
    assert lang is None, f"{path}: a code block opened at line {start - 1} is never closed"
    return out


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


PYTHON_PAGES = [p for p in PAGES if any(lang == "python" and not code.startswith(NOT_RUN) for lang, _, code in _blocks(p))]


def test_the_pages_with_examples_are_found():
    names = {_name(p) for p in PYTHON_PAGES}
    assert {"README.md", "docs/index.md", "docs/losses.md", "docs/models.md"} <= names, names


@pytest.mark.slow
@pytest.mark.parametrize("page", PYTHON_PAGES, ids=_name)
def test_python_examples_run(page, tmp_path):
    parts, where = [], []
    for lang, line, code in _blocks(page):
        if lang != "python" or code.startswith(NOT_RUN):
            continue
        parts.append(f"# ---- {_name(page)}:{line}\n{code}")
        where.append(f"{_name(page)}:{line}")
    script = tmp_path / "examples.py"
    script.write_text("".join(parts))
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"the examples of {_name(page)} (blocks at {', '.join(where)}; script {script}) failed:\n{p.stderr[-4000:]}"


def _commands(prefix: str) -> list:
    """``[(where, argv), ...]``: every line of a bash block, in every page,
    whose command starts with ``prefix`` (environment assignments before it
    and ``#`` comments dropped; ``...`` stands for more arguments and is
    dropped too)."""
    found = []
    for page in PAGES:
        for lang, start, code in _blocks(page):
            if lang != "bash":
                continue
            for k, line in enumerate(code.splitlines()):
                argv = [a for a in shlex.split(line, comments=True) if a != "..."]
                while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
                    argv = argv[1:]
                if argv[:len(prefix)] == prefix:
                    found.append((f"{_name(page)}:{start + k}", argv))
    return found


def test_cli_examples_parse_with_the_real_parser():
    from jaxyolo.cli import build_parser

    lines = _commands(["jaxyolo"])
    assert len(lines) >= 15, lines
    bad = []
    for where, argv in lines:
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit:
            bad.append(f"{where}: {shlex.join(argv)}")
    assert not bad, "command lines the CLI refuses:\n" + "\n".join(bad)


def _slug(heading: str) -> str:
    """The anchor mkdocs' ``toc`` (and GitHub) gives a heading."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[\s]+", "-", text).strip("-")


def test_readme_links_resolve():
    """README.md is outside the site (the strict build checks docs/ only): its
    relative links and their anchors are checked here."""
    bad = []
    links = re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text())
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        if not target.exists():
            bad.append(f"{link}: no {path}")
        elif anchor and anchor not in {_slug(h) for h in re.findall(r"^#+ (.+)$", target.read_text(), re.M)}:
            bad.append(f"{link}: no heading #{anchor} in {path}")
    assert len(links) >= 10 and not bad, bad


def test_named_scripts_exist():
    missing = [f"{w}: {a[1]}" for w, a in _commands(["python"]) + _commands(["bash"]) if a[1].endswith((".py", ".sh")) and not (ROOT / a[1]).is_file()]
    assert not missing, missing


@pytest.mark.slow
def test_docs_build_strictly(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    assert "--save-every" in cli and "jaxyolo predict" in cli  # generated from the parsers at build time
    api = (tmp_path / "site" / "api" / "losses" / "index.html").read_text()
    assert "focal_loss" in api and "qfocal_loss" in api  # rendered from the docstrings
