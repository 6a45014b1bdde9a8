"""`sbs-data-stats` (`python -m sbs_jax.data.stats --data_dir DIR`): per-split figures of the
released data (see sbs_jax.data.stats).
"""

from __future__ import annotations

import argparse
import json
import sys

from sbs_jax.data import dss, stats
from sbs_jax.runtime import console


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sbs-data-stats",
                                     description=stats.__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True,
                        help="the released-data folder (dss_data: {ds}/{ds}_{split}.json, llm/)")
    parser.add_argument("--dataset", action="append", choices=dss.DSS_DATASETS,
                        help="repeatable; default: every dataset present")
    parser.add_argument("--skip_bad", action="store_true",
                        help="exit 0 even with malformed rows (they are listed and left out of "
                             "the figures either way)")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)
    try:
        rows = stats.collect(args.data_dir, args.dataset)
    except (FileNotFoundError, dss.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for r in rows:
        if "warning" in r:
            console.say(f"warning: {r['warning']}", file=sys.stderr)
    print(stats.format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    bad = [problem for r in rows for problem in r.get("bad_rows", [])]
    if bad and not args.skip_bad:
        print(f"error: {dss.describe_problems(bad)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
