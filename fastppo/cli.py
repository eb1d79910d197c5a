"""The `fastppo` command: check | bench | train | plot."""

from __future__ import annotations

import sys

USAGE = """usage: fastppo [--version] {check,bench,train,plot} [options]
  check   versions, backends and every op against its reference
  bench   bytes, launches, memory and projected/measured GPU time per op (--help)
  train   PPO/GRPO on Hugging Face models; with no model paths, the embedded demo (--help)
  plot    redraw curves.png from one or several runs' metrics.jsonl (--help)"""


def _check(argv) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="fastppo check", description="Print versions and the backend per "
                                     "device, and run every op against its reference (exit status 1 on a mismatch).")
    parser.parse_args(argv)
    from .check import run_check

    return 0 if run_check() else 1


def _exit_code(e: SystemExit) -> int:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"fastppo {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "check":
            return _check(rest)
        if cmd == "bench":
            from .bench.cli import main as bench_main

            return bench_main(rest)
        if cmd == "train":
            from .trainer.cli import main as train_main

            return train_main(rest)
        if cmd == "plot":
            from .trainer.plot import main as plot_main

            return plot_main(rest)
    except SystemExit as e:   # argparse's --help / usage errors
        return _exit_code(e)
    print(f"fastppo: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
