"""The documentation's references resolve inside the repository.

A user's clone is all a reader has: every "SPEC n" must name a section of docs/spec.md, every mentioned ``*.md``
file and every relative Markdown link must exist in the clone, and nothing may point outside it (an earlier
specification lived beside the project, and its references dangled in every clone).
"""

import os
import re
import subprocess
from functools import lru_cache

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "docs", "spec.md")
SPEC_SECTIONS = [str(n) for n in range(1, 9)]  # the sections every "SPEC n" in the code base relies on
TEXT_SUFFIXES = (".py", ".md", ".cpp", ".h", ".cu", ".cuh", ".toml", ".cfg", ".txt", ".json", ".sh", ".yml", ".yaml")
TEXT_NAMES = ("Makefile",)


@lru_cache(maxsize=None)
def repo_files():
    """Tracked files (paths relative to the root, '/'-separated); every file outside .git without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = []
    if not files:
        skip = {".git", "__pycache__", "build", ".pytest_cache", ".benchmarks"}
        for base, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(base, n), ROOT).replace(os.sep, "/") for n in names]
    return tuple(sorted(files))


def text_files():
    for rel in repo_files():
        if rel.endswith(TEXT_SUFFIXES) or os.path.basename(rel) in TEXT_NAMES:
            path = os.path.join(ROOT, rel)
            if os.path.isfile(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    yield rel, f.read()


def line_of(text, index):
    return text.count("\n", 0, index) + 1


def headings(path):
    with open(path, encoding="utf-8") as f:
        return [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+)$", f.read(), flags=re.M)]


def section_numbers(path):
    """'1', '2', '2.1', ... for headings that start with a number."""
    numbers = set()
    for h in headings(path):
        m = re.match(r"(\d+(?:\.\d+)*)\.?\s", h)
        if m:
            numbers.add(m.group(1))
    return numbers


def github_anchor(heading):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_spec_is_in_the_repository_with_sections_1_to_8():
    assert os.path.isfile(SPEC), "docs/spec.md, the project's specification, is missing"
    numbers = section_numbers(SPEC)
    missing = [n for n in SPEC_SECTIONS if n not in numbers]
    assert not missing, f"docs/spec.md lacks sections {missing} (found {sorted(numbers)})"
    with open(SPEC, encoding="utf-8") as f:
        head = f.read(3000)
    assert '"SPEC n"' in head and "docs/spec.md" in head, "docs/spec.md must state what \"SPEC n\" refers to"


def test_every_spec_reference_names_an_existing_section():
    numbers = section_numbers(SPEC)
    pattern = re.compile(r"\bSPEC\s+(?:sections?\s+)?(\d+(?:\.\d+)?)(?:\s*(?:-|and|,)\s*(\d+(?:\.\d+)?))?")
    dangling = []
    for rel, text in text_files():
        for m in pattern.finditer(text):
            for ref in filter(None, m.groups()):
                if ref not in numbers:
                    dangling.append(f"{rel}:{line_of(text, m.start())}: {m.group(0)!r}")
    assert not dangling, "references to sections docs/spec.md does not have:\n" + "\n".join(dangling)


def test_no_reference_leaves_the_repository():
    # The old specification and its notes lived beside the project (../shared, /work/shared).
    forbidden = re.compile(r"\.\./shared\b|/work/|\bSPEC\.md\b")
    found = []
    for rel, text in text_files():
        if rel == "tests/test_docs.py":
            continue
        for m in forbidden.finditer(text):
            found.append(f"{rel}:{line_of(text, m.start())}: {m.group(0)!r}")
    assert not found, "references to files outside the repository:\n" + "\n".join(found)


# Markdown files the project writes (reports), not documents it ships: mentioned by name, never in the repository.
GENERATED_MARKDOWN = {"summary.md"}


def test_every_mentioned_markdown_file_exists():
    files = repo_files()
    mention = re.compile(r"[A-Za-z0-9_./~-]*[A-Za-z0-9_-]\.md\b")
    missing = []
    for rel, text in text_files():
        if rel == "tests/test_docs.py":
            continue
        for m in mention.finditer(text):
            name = m.group(0).lstrip("./")
            here = os.path.normpath(os.path.join(os.path.dirname(rel), m.group(0))).replace(os.sep, "/")
            # A mention resolves from the root, from the mentioning file's folder, or as the tail of a path.
            if name in GENERATED_MARKDOWN or name in files or here in files or any(f.endswith("/" + name) for f in files):
                continue
            missing.append(f"{rel}:{line_of(text, m.start())}: {m.group(0)}")
    assert not missing, "mentioned Markdown files that are not in the repository:\n" + "\n".join(missing)


@pytest.mark.parametrize("doc", ["README.md", "docs/spec.md", "docs/architecture.md", "docs/datasets.md",
                                 "benchmarks/README.md"])
def test_relative_links_resolve(doc):
    path = os.path.join(ROOT, doc)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    broken = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(dest):
            broken.append(f"{doc}:{line_of(text, m.start())}: {target} (no such file)")
        elif anchor and dest.endswith(".md") and anchor not in {github_anchor(h) for h in headings(dest)}:
            broken.append(f"{doc}:{line_of(text, m.start())}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_points_to_the_spec_and_the_architecture():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "](docs/spec.md" in readme, "the README must link docs/spec.md"
    assert "](docs/architecture.md)" in readme, "the README must link docs/architecture.md"
    assert '"SPEC n"' in readme, "the README must say what \"SPEC n\" refers to"
