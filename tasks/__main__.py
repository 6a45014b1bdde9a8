"""List the registered SeqIO tasks and mixtures: `python -m tasks --list [REGEX]`.

One line each: name, kind, what it yields, and the metrics of tasks that have some. Nothing is
read: data folders and the vocabulary are resolved only when a task is read.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence


def listing(pattern: str = "") -> list[str]:
    """`name  kind  description [metrics]` for every registered name matching `pattern`."""
    import seqio

    from tasks.registry import DESCRIPTIONS

    wanted = re.compile(pattern)
    rows = []
    for kind, registry in (("task", seqio.TaskRegistry), ("mixture", seqio.MixtureRegistry)):
        for name in registry.names():
            if not wanted.search(name):
                continue
            provider = registry.get(name)
            metrics = [getattr(fn, "__name__", str(fn))
                       for fn in getattr(provider, "metric_fns", ())]
            description = DESCRIPTIONS.get(name, str(getattr(provider, "source", "")))
            rows.append((name, kind, description + (f"  [{', '.join(metrics)}]" if metrics
                                                    else "")))
    width = max((len(name) for name, _, _ in rows), default=0)
    return [f"{name:<{width}}  {kind:<7}  {text}" for name, kind, text in sorted(rows)]


def main(argv: Sequence[str] | None = None, prog: str = "python -m tasks") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", required=True,
                        help="print the registered tasks and mixtures, one a line")
    parser.add_argument("pattern", nargs="?", default="",
                        help="only names matching this regular expression (e.g. '^cqa_')")
    args = parser.parse_args(argv)
    try:
        re.compile(args.pattern)
    except re.error as exc:
        parser.error(f"pattern {args.pattern!r}: {exc}")
    lines = listing(args.pattern)
    if not lines:
        print(f"{parser.prog}: no task or mixture matches {args.pattern!r}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
