"""Rewrite the README's families x methods table from the matrix of tests/family_matrix.py.

Every cell runs the package on a small random model of the family and compares it with a
plain-hooks oracle (about a minute on two cores); the section between the README's
family-table markers is replaced by the result. ``--check`` only says whether it is current
(exit 1 when not). tests/test_family_matrix.py asserts the same, so the table cannot drift.

    python tools/family_table.py            # rewrite README.md's section
    python tools/family_table.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the table is stale")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(ROOT / "tests"))
    import family_matrix

    text = README.read_text()
    start, end = family_matrix.START, family_matrix.END
    if start not in text or end not in text:
        print(f"README.md has no family-table markers ({start} ... {end})", file=sys.stderr)
        return 2
    table = family_matrix.table()
    new = text[:text.index(start)] + table + text[text.index(end) + len(end):]
    failing = [(f, i, m, family_matrix.outcome(f, i, m).status)
               for f in family_matrix.FAMILIES for i in family_matrix.IMPLS
               for m in family_matrix.METHODS if not family_matrix.outcome(f, i, m).ok]
    for family, impl, method, status in failing:
        print(f"failing cell: {family} ({impl}) {method}: {status}", file=sys.stderr)
    if args.check:
        print("the family table is " + ("current" if new == text else "stale"))
        return 0 if new == text else 1
    README.write_text(new)
    print(table.split("\n")[2])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
