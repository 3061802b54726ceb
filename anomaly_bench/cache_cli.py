"""``anomaly-bench-cache [DIR] [--clear | --max-gb N]``: show, clear or trim the feature cache.

Also ``python -m anomaly_bench.cache_cli``. DIR defaults to the configuration's default
``backbone.cache.dir``. Only files named as the cache names them
(``<DIR>/<16 hex>/<2 hex>/<40 hex>.safetensors`` and the writers' temp files beside them)
are removed, so pointing it at another folder removes nothing else. Jobs running
meanwhile recompute what vanishes under them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from anomaly_bench.backbones import cache as fc


def main(argv: Sequence[str] | None = None) -> int:
    """``anomaly-bench-cache [DIR] [--clear | --max-gb N]``: show, clear or trim a cache."""
    ap = argparse.ArgumentParser(
        prog="anomaly-bench-cache",
        description="Show the size of the feature cache (backbone.cache.dir), clear it, or "
                    "trim it to a size by removing the least recently used entries. Only "
                    "files named as the cache names them are touched.")
    ap.add_argument("dir", nargs="?", type=Path, default=None,
                    help="the cache folder (default: $ANOMALY_BENCH_CACHE, else "
                         "$ANOMALY_BENCH_DATA/.cache/features, else data/.cache/features)")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--clear", action="store_true", help="remove every entry")
    what.add_argument("--max-gb", type=float, metavar="N",
                      help="remove least recently used entries until at most N GiB remain")
    args = ap.parse_args(argv)
    root = (args.dir or fc.default_dir()).expanduser()
    if not root.is_dir():
        print(f"{root}: no such folder, nothing to do")
        return 0
    if args.clear:
        r = fc.clear(root)
        print(f"removed {r.entries} entries ({fc.human(r.bytes)}) and {r.temp_files} "
              f"temp files from {root.resolve()}")
    elif args.max_gb is not None:
        if args.max_gb < 0:
            ap.error("--max-gb must be >= 0")
        r = fc.trim(root, int(args.max_gb * fc.GIB))
        print(f"removed {r.entries} least recently used entries ({fc.human(r.bytes)}) "
              f"and {r.temp_files} stale temp files; kept {r.kept_entries} entries "
              f"({fc.human(r.kept_bytes)}) in {root.resolve()}")
    else:
        print(fc.describe(root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
