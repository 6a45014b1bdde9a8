"""How a benchmark hands back its result: JSON on stdout, and the same in a file on request."""

from __future__ import annotations

import json
from typing import Any


def emit(result: dict[str, Any], json_out: str | None = None) -> dict[str, Any]:
    """Prints `result` as JSON and writes it to `json_out` when given; returns it."""
    print(json.dumps(result, indent=2))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result
