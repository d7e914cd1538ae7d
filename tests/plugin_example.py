"""docs/plugins.md's example strategy as a file: the page's code block is the plugin the tests run."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).parents[1] / "docs" / "plugins.md"


def write_plugin_example(folder: Path) -> Path:
    """folder/l2_pull.py holding the page's Python block; returns folder (for the import path)."""
    code = re.search(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S).group(1)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "l2_pull.py").write_text(code, encoding="utf-8")
    return folder
