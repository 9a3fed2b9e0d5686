"""Every link and every cited section in the repository points at something that exists.

What is checked:

1. every markdown file: each link ``[text](target)``, reference definition ``[id]: target`` and
   ``<img src=...>`` / ``<a href=...>`` target is either a web address (``http:``, ``https:``,
   ``mailto:``) or a relative path that stays inside the repository, names a file or folder that
   exists, and, when it carries ``#anchor``, names a heading of that markdown file (GitHub's heading
   slugs; ``#anchor`` alone means the same file);
2. every text file of the code, tests, tutorials, benchmarks and docs, and the top-level markdown
   files: each cited section written as a repository path to a markdown file under docs/ followed
   by ``#anchor`` names a file that exists and one of its headings;
3. no file mentions the old documents outside the repository (the shared folder above it, or the
   two documents it held), except this test and CHANGELOG.md, which tells their history.

Headings inside fenced code blocks are not headings, and links inside code are not links.
Nothing here needs the network: web addresses are only recognised, never fetched.
"""
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()

# Folders never looked into: version control, environments, caches, build and run outputs
# (the folders of .gitignore).
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", "build", "dist", ".pytest_cache",
             ".hypothesis", ".ipynb_checkpoints", ".mypy_cache", ".ruff_cache", "runs"}
SKIP_PATHS = {"bench/results"}
SKIP_SUFFIXES = {".pyc", ".ipynb", ".nbi", ".nbc", ".npz", ".npy"}
CITING_DIRS = ("rt_numpy", "tests", "tutorials", "bench", "docs")
WEB_SCHEMES = {"http", "https", "mailto"}
# The notes kept outside the repository before docs/ held their text.  Spelt in pieces so that
# this file does not name them either, and needs no exception.
OLD_NAMES = ("/".join(("..", "shared")), "SPEC" + ".md", "DESIGN" + ".md")


def _rel(path):
    return path.relative_to(ROOT).as_posix()


def _files():
    """Every file of the repository, as sorted paths, outside the skipped folders."""
    out = []

    def walk(folder):
        for entry in sorted(folder.iterdir()):
            if entry.is_dir():
                if not (entry.name in SKIP_DIRS or entry.name.endswith(".egg-info")
                        or _rel(entry) in SKIP_PATHS or entry.is_symlink()):
                    walk(entry)
            elif entry.is_file() and entry.suffix not in SKIP_SUFFIXES:
                out.append(entry)

    walk(ROOT)
    return out


def _text(path):
    """The file's text, or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


ALL_FILES = _files()
MD_FILES = [p for p in ALL_FILES if p.suffix == ".md"]
CITING_FILES = [p for p in ALL_FILES
                if (p.parent == ROOT and p.suffix == ".md") or _rel(p).split("/")[0] in CITING_DIRS]


# --------------------------------------------------------------------------------------------
# Markdown: fences, headings, slugs, links

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)")
HTML_TAG = re.compile(r"<[^>]+>")
HTML_ANCHOR = re.compile(r"<a\b[^>]*\b(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def slug(heading):
    """GitHub's anchor for a heading's text (without the numbering of duplicates).

    Lower case, surrounding spaces stripped, every character that is not a letter, a digit, a
    space, a hyphen or an underscore removed (letters of any script are kept), then each space
    becomes a hyphen.  Markup is dropped first: a link counts by its text, HTML tags by nothing.
    """
    text = INLINE_LINK.sub(r"\1", heading)
    text = HTML_TAG.sub("", text).strip().lower()
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in " -" or cat[0] in "LNM" or cat == "Pc":  # Pc: the underscore and its kin
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def _outside_fences(text):
    """(line number, line) of every line that is not inside a fenced code block, nor a fence."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
                continue
            yield number, line
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                and not line[m.end():].strip():
            fence = None


def anchors(text):
    """The anchors of a markdown text: its heading slugs (duplicates get -1, -2, ...) and any
    ``<a name=...>`` / ``<a id=...>``."""
    seen, out = {}, set()

    def add(heading):
        s = slug(heading)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")

    previous = None  # the paragraph line a setext underline would turn into a heading
    for _, line in _outside_fences(text):
        m = ATX.match(line)
        if m:
            add(m.group(2) or "")
            previous = None
            continue
        if previous is not None and SETEXT.match(line):
            add(previous)
            previous = None
            continue
        out.update(HTML_ANCHOR.findall(line))
        stripped = line.strip()
        is_paragraph = stripped and not line.startswith(("    ", "\t")) and not re.match(
            r"(\||>|[-*+] |\d+[.)] |<)", stripped) and not SETEXT.match(line)
        previous = stripped if is_paragraph else None
    return out


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_LINK = re.compile(r"<(?:img|a|source)\b[^>]*\b(?:src|href)\s*=\s*[\"']([^\"']*)[\"']", re.IGNORECASE)
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def links(text):
    """(line number, target) of every link of a markdown text outside code."""
    for number, line in _outside_fences(text):
        if line.startswith(("    ", "\t")) and not line.lstrip().startswith(("-", "*", "|")):
            continue  # indented code block (list continuations and tables stay)
        line = CODE_SPAN.sub("", line)
        m = REFERENCE.match(line)
        if m:
            yield number, m.group(1).strip("<>")
        for m in LINK.finditer(line):
            yield number, m.group(1).strip("<>")
        for m in HTML_LINK.finditer(line):
            yield number, m.group(1)


_ANCHOR_CACHE = {}


def _anchors_of(path):
    if path not in _ANCHOR_CACHE:
        _ANCHOR_CACHE[path] = anchors(path.read_text(encoding="utf-8"))
    return _ANCHOR_CACHE[path]


def _check_anchor(target_file, anchor):
    """None if ``anchor`` names a heading of ``target_file``, else why not."""
    if target_file.suffix != ".md":
        if re.fullmatch(r"L\d+(-L\d+)?", anchor):  # GitHub's line anchors in a non-markdown file
            return None
        return f"#{anchor}: {_rel(target_file)} is not markdown, it has no headings"
    if anchor not in _anchors_of(target_file):
        return f"#{anchor} is not a heading of {_rel(target_file)}"
    return None


def _check_link(md_file, target):
    """None if the link is good, else a description of what is wrong."""
    m = SCHEME.match(target)
    if m:
        if m.group(1).lower() in WEB_SCHEMES:
            return None
        return f"scheme {m.group(1)}: points outside the repository"
    path_part, _, anchor = target.partition("#")
    path_part, anchor = unquote(path_part), unquote(anchor)
    if path_part.startswith("/"):
        return "absolute path: links must be relative to the file"
    resolved = (md_file.parent / path_part).resolve() if path_part else md_file
    if not resolved.is_relative_to(ROOT):
        return "leaves the repository"
    if not resolved.exists():
        return f"{_rel(resolved)} does not exist"
    if anchor:
        if resolved.is_dir():
            return f"#{anchor} on a folder"
        return _check_anchor(resolved, anchor)
    return None


@pytest.mark.parametrize("md_file", MD_FILES, ids=_rel)
def test_markdown_links_resolve(md_file):
    text = md_file.read_text(encoding="utf-8")
    bad = []
    for number, target in links(text):
        why = _check_link(md_file, target)
        if why:
            bad.append(f"{_rel(md_file)}:{number}: ({target}) {why}")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------------------------
# Cited sections: a repository path to a markdown file under docs/, then #anchor

CITATION = re.compile(r"(?<![\w-])docs/[\w./-]+\.md#[\w-]+")


@pytest.mark.parametrize("path", CITING_FILES, ids=_rel)
def test_cited_sections_exist(path):
    text = _text(path)
    if text is None:
        pytest.skip("binary file")
    bad = []
    for number, line in enumerate(text.splitlines(), 1):
        for citation in CITATION.findall(line):
            file_part, _, anchor = citation.partition("#")
            target = (ROOT / file_part).resolve()
            if not target.is_relative_to(ROOT):
                why = "leaves the repository"
            elif not target.is_file():
                why = f"{file_part} does not exist"
            else:
                why = _check_anchor(target, anchor)
            if why:
                bad.append(f"{_rel(path)}:{number}: {citation}: {why}")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------------------------
# The old documents outside the repository are cited nowhere

@pytest.mark.parametrize("path", ALL_FILES, ids=_rel)
def test_no_old_document_names(path):
    text = _text(path)
    if text is None:
        pytest.skip("binary file")
    bad = [f"{_rel(path)}:{number}: mentions {name!r}"
           for number, line in enumerate(text.splitlines(), 1)
           for name in OLD_NAMES if name in line]
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------------------------
# The slug rules themselves, on headings whose GitHub anchors are known

def test_slug_rules():
    assert slug("1.4 Attention inside a cluster") == "14-attention-inside-a-cluster"
    assert slug("  Map: module ↔ paper / algorithm ↔ tutorial ") == "map-module--paper--algorithm--tutorial"
    assert slug("`kmeans_update.npz`: one step") == "kmeans_updatenpz-one-step"
    assert slug("Ünïcode Über-Größe") == "ünïcode-über-größe"
    assert slug("A [link](x.md#y) inside") == "a-link-inside"
    text = "# Tests\n\n```\n# not a heading\n```\n\n## Tests\n\nSetext\n---\n\n### Tests\n"
    assert anchors(text) == {"tests", "tests-1", "setext", "tests-2"}
