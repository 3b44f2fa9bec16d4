"""The paper's table numbers (a copy of paper-tables.json shipped with the package)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def paper_tables() -> dict[str, Any]:
    """Every number of the paper's tables: params and MAdds in millions, top-1 in percent."""
    return json.loads(resources.files("dcd_lightning").joinpath("paper_tables.json").read_text())


def paper_row(table: str, index: int) -> dict[str, Any]:
    """One row of one table."""
    return paper_tables()[table][index]
