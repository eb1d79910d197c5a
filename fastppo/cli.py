"""The `fastppo` command: check | bench | train."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: fastppo {check,bench,train} [options]\n"
             "  check   versions, backends and every op against its reference\n"
             "  bench   bytes, launches, memory and projected/measured GPU time per op (--help)\n"
             "  train   PPO/GRPO on Hugging Face models; with no model paths, the embedded demo (--help)")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "check":
        from .check import run_check

        return 0 if run_check() else 1
    if cmd == "bench":
        from .bench.cli import main as bench_main

        return bench_main(rest)
    if cmd == "train":
        from .trainer.cli import main as train_main

        return train_main(rest)
    print(f"fastppo: unknown command {cmd!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
