"""Relative links in README.md and docs/**/*.md point at files and headings that exist.

For every markdown link ``[text](path)`` or ``[text](path#anchor)`` (and ``[text](#anchor)``)
outside code blocks and code spans, the path must exist relative to the file that links, and
the anchor must be the slug of a heading of the target, made by GitHub's rule: lower case, code
spans' backticks and every other character but letters, digits, '-' and '_' dropped, each space
turned into '-', and a heading whose slug already occurred gets -1, -2, ... appended.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^\s{0,3}(```+|~~~+)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"(?<!!)\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")      # http:, https:, mailto:, ...


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose_lines(text: str):
    """(line number, line) of the lines outside fenced code blocks."""
    fence = None
    for i, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            mark = m.group(1)
            if fence is None:
                fence = mark[0] * 3
            elif mark.startswith(fence):
                fence = None
            continue
        if fence is None:
            yield i, line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text (before de-duplication)."""
    text = LINK.sub(lambda m: m.group(1), heading)          # a link in a heading: its text
    text = text.lower().replace("`", "")
    keep = []
    for c in text:
        cat = unicodedata.category(c)
        if c in "-_ " or cat[0] in "LM" or cat in ("Nd", "Nl"):
            keep.append("-" if c == " " else c)
    return "".join(keep)


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def links(path: Path):
    """(line number, target) of the relative links of a markdown file."""
    for i, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(CODE_SPAN.sub("", line)):
            target = m.group(2)
            if not EXTERNAL.match(target):
                yield i, target


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    bad = []
    for i, target in links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{i}: ({target})"
        if not dest.exists():
            bad.append(f"{where} no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{where} no heading with anchor #{anchor} in {dest.name}")
    return bad


def test_slug_rule():
    assert slug("The mouth check: where the mouth-box PSNR is lost (oracles)") == \
        "the-mouth-check-where-the-mouth-box-psnr-is-lost-oracles"
    assert slug("`pyface eval otavatar` vs copy-source") == "pyface-eval-otavatar-vs-copy-source"
    assert slug("CLeBS: retrieval from 128² frames, 2x") == "clebs-retrieval-from-128-frames-2x"
    assert slug("model_s2 & the [GAN](x.md)") == "model_s2--the-gan"


def test_anchors_numbers_duplicates(tmp_path):
    md = tmp_path / "a.md"
    md.write_text("# Title\n## Measured\n```\n# not a heading\n```\n## Measured\n## Measured\n")
    assert anchors(md) == {"title", "measured", "measured-1", "measured-2"}


def test_broken_link_is_found(tmp_path):
    (tmp_path / "b.md").write_text("# B\n## Real section\n")
    md = tmp_path / "a.md"
    md.write_text("[ok](b.md#real-section) [x](b.md#no-section) [y](c.md) "
                  "`[z](c.md)` [self](#a)\n# A\n")
    bad = broken_links(md, root=tmp_path)
    assert len(bad) == 2 and "#no-section" in bad[0] and "c.md" in bad[1]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    bad = broken_links(path)
    assert not bad, "broken links:\n" + "\n".join(bad)
