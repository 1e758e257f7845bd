"""The README as the README tests read it: a section by its heading, and that section's code blocks."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parents[2] / "README.md"


def section(heading: str) -> str:
    """The README's text under `heading` (e.g. "## Run a node"), up to the next heading of the same or a
    higher level; a code block's `# comment` lines do not end it (they have one '#')."""
    level = len(heading) - len(heading.lstrip("#"))
    return re.split(rf"\n#{{2,{level}}} ", README.read_text().split(heading, 1)[1], maxsplit=1)[0]


def blocks(heading: str, lang: str) -> list[str]:
    """The `lang` code blocks of that section, in order."""
    return re.findall(rf"```{lang}\n(.*?)```", section(heading), re.S)
