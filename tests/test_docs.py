"""The docs are self-contained: every relative link and every ``docs/...`` reference in the README,
the docs, the code and the configs resolves (down to the ``§N.M`` section it names), and no tracked
file points outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = (".md", ".py", ".yaml", ".txt", ".toml", ".cfg")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")                     # markdown [text](target)
# "docs/<file>" or "docs/<file> §N.M", but not "owner/repo:docs/<file>" (another repository's path)
DOCREF = re.compile(r"(?<![\w/.:])docs/([\w./-]+\.(?:md|txt))(?:,?\s+§\s?(\d+(?:\.\d+)?))?")
# history snapshots are generated records of their time; data files are third-party text; this
# file's own examples are broken on purpose
SKIP = ("data/", "results/history/", "tests/test_docs.py")


def tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / f for f in out.split() if f.endswith(TEXT) and not f.startswith(SKIP) and (ROOT / f).exists()]


def sections(doc: Path) -> set[str]:
    """Section numbers of a doc's headings (``## 3. ...`` -> 3, ``### 3.4 ...`` -> 3.4)."""
    return {m.group(1) for m in re.finditer(r"^#+\s+§?(\d+(?:\.\d+)?)\.?\s", doc.read_text(), re.M)}


def broken_refs(files: list[Path]) -> list[str]:
    bad = []
    for f in files:
        text = f.read_text(errors="replace")
        for target in LINK.findall(text) if f.suffix == ".md" else []:
            if re.match(r"^(https?:|mailto:|#)", target):
                continue
            if not (f.parent / target.split("#")[0]).exists():
                bad.append(f"{f.relative_to(ROOT)}: link {target}")
        for name, sec in DOCREF.findall(text):
            doc = ROOT / "docs" / name
            if not doc.exists():
                bad.append(f"{f.relative_to(ROOT)}: docs/{name} does not exist")
            elif sec and sec not in sections(doc):
                bad.append(f"{f.relative_to(ROOT)}: docs/{name} has no section §{sec}")
    return bad


def test_every_link_and_docs_reference_resolves():
    files = tracked()
    assert any(f.name == "README.md" for f in files) and any("docs" in f.parts for f in files)
    assert broken_refs(files) == []


def test_the_checker_catches_a_broken_reference():
    g = ROOT / "tests" / "_tmp_ref_check.md"   # under ROOT: reports name files relative to it
    g.write_text("See docs/method.md §3.4 and docs/method.md §99.9, [here](nowhere.md) and docs/nope.md.\n")
    try:
        bad = broken_refs([g])
    finally:
        g.unlink()
    assert len(bad) == 3 and any("§99.9" in b for b in bad) and any("nowhere.md" in b for b in bad)


def test_no_tracked_file_points_outside_the_repository():
    hits = [str(f.relative_to(ROOT)) for f in tracked() if "../" + "shared" in f.read_text(errors="replace")]
    assert hits == []
