"""The documentation: the MkDocs site builds with --strict, and the README stays a front door."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 250

# [text](target) and ![alt](target), and reference definitions "[name]: target"
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def test_docs_site_builds_strictly(tmp_path):
    """Broken links or anchors, pages missing from the nav, mkdocstrings failing to find a
    public name or the CLI reference hook failing: each is a warning, and --strict fails on it."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    cli = (tmp_path / "cli" / "index.html").read_text(encoding="utf-8")
    assert "imgclf train" in cli and "--max-request-mb" in cli  # the generated reference is on the page
    api = (tmp_path / "python-api" / "index.html").read_text(encoding="utf-8")
    assert "ImageClassificationTrainer" in api and "fit_and_hold_out" in api


def _relative_links(markdown: str) -> list[str]:
    text = _FENCE.sub("", markdown)  # links inside code blocks are examples, not links
    targets = _INLINE_LINK.findall(text) + _REFERENCE_LINK.findall(text)
    return [t for t in targets if not re.match(r"^(?:[a-z][a-z0-9+.-]*:|#|//)", t, re.IGNORECASE)]


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text(encoding="utf-8")
    lines = len(text.splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; the depth belongs in docs/ (at most {README_MAX_LINES})"
    )
    links = _relative_links(text)
    assert links, "README.md links to no file: expected links into docs/"
    missing = [link for link in links if not (ROOT / unquote(link.split("#", 1)[0])).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_pages_name_the_manifest_columns_the_code_takes():
    """Each page that says which column is the path or the label lists imgclf's own names, in
    order (one page left out ``file_name``, Hugging Face's; ``--help`` had them out of order)."""
    from imgclf.options import LABEL_COLUMNS, PATH_COLUMNS

    said = {}
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = " ".join(page.read_text(encoding="utf-8").split())
        for kind, names in (("path", PATH_COLUMNS), ("label", LABEL_COLUMNS)):
            pattern = rf"the {kind} column (?:is )?the first of ((?:`[a-z_]+`[, ]*(?:or )?)+)"
            for listed in re.findall(pattern, text, re.IGNORECASE):
                said[f"{page.name} ({kind})"] = (tuple(re.findall(r"`([a-z_]+)`", listed)), names)
    assert len(said) >= 4, said  # quickstart and the Python API page, path and label each
    wrong = {where: got for where, (got, want) in said.items() if got != want}
    assert not wrong, wrong
