"""The fenced code blocks of README.md and docs/**/*.md, in reading order, with the docs-test marker before each.

A block runs as written (tests/docs/test_run_blocks.py: bash and python; tests/docs/test_blocks.py: yaml) unless the
nearest non-blank line above its opening fence is a marker with a reason:

    <!-- docs-test: skip (runs 17 minutes; its output is docs/results/alloc_compare.md) -->

A marker without a reason, an unknown directive, a marker with no block under it, an unclosed fence and a fence
this reader does not take (indented, or ~~~) are problems the fast tier reports (page:line each)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]  # the order the blocks run in
RUNS = {"bash", "python", "yaml"}  # the kinds of block the docs tests run or check
FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:(.*?)-->\s*$")
SKIP = re.compile(r"^skip \((.*\S.*)\)$")
HIDDEN_FENCE = re.compile(r"^(\s+```|\s*~~~)")  # fences this reader does not take; refused so none hides a block


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root, e.g. docs/usage.md
    line: int  # 1-based line of the opening fence
    lang: str  # the fence's info string: bash, python, yaml, json, or ""
    text: str
    skip: str | None  # the marker's reason; None for a block that runs

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def parse(text: str, page: str) -> tuple[list[Block], list[str]]:
    """The blocks of one markdown text and its marker problems (each 'page:line: what')."""
    blocks: list[Block] = []
    problems: list[str] = []
    lines = text.splitlines()
    marker: tuple[int, str | None] | None = None  # (line, reason) of a marker waiting for its block
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := MARKER.match(line):
            if marker is not None:
                problems.append(f"{page}:{marker[0]}: docs-test marker with no code block under it")
            directive = m.group(1).strip()
            reason = SKIP.match(directive)
            if reason is None:
                problems.append(f"{page}:{i + 1}: {directive!r}: a docs-test marker is 'skip (<reason>)', "
                                "with a reason")
            marker = (i + 1, reason.group(1).strip() if reason else None)
        elif m := FENCE.match(line):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                problems.append(f"{page}:{i + 1}: code block never closed")
                break
            skip = marker[1] if marker is not None else None
            if marker is not None and marker[1] is None:
                skip = "(marker without a reason)"  # reported above; the block is not run either way
            blocks.append(Block(page, i + 1, m.group(1), "\n".join(lines[i + 1:end]) + "\n", skip))
            marker = None
            i = end
        elif HIDDEN_FENCE.match(line):
            problems.append(f"{page}:{i + 1}: an indented or ~~~ fence: start code blocks with ``` at column 0")
        elif line.strip() and marker is not None:
            problems.append(f"{page}:{marker[0]}: docs-test marker with no code block under it")
            marker = None
        i += 1
    if marker is not None:
        problems.append(f"{page}:{marker[0]}: docs-test marker with no code block under it")
    return blocks, problems


def all_blocks() -> tuple[list[Block], list[str]]:
    """Every page's blocks in PAGES order, and every page's marker problems."""
    blocks: list[Block] = []
    problems: list[str] = []
    for path in PAGES:
        b, p = parse(path.read_text("utf-8"), path.relative_to(ROOT).as_posix())
        blocks += b
        problems += p
    return blocks, problems
