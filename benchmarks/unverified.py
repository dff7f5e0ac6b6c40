"""Run the ``moe`` CLI with the hardware verdicts of the named backends lifted, for the first measurements
of a backend whose GPU parity test has just passed in the same call (its off switch, ``HARDWARE_VERDICT``,
is flipped in the source only once those numbers are in).

    python3 benchmarks/unverified.py sonic -- bench --preset dsv3 --backends triton,sonic
"""

from __future__ import annotations

import importlib
import sys


def main(argv: list[str]) -> int:
    if "--" not in argv:
        raise SystemExit("usage: unverified.py BACKEND[,BACKEND...] -- MOE_ARGS...")
    split = argv.index("--")
    for name in ",".join(argv[:split]).split(","):
        module = importlib.import_module(f"moe.backends.{name}")
        if not hasattr(module, "HARDWARE_VERDICT"):
            raise SystemExit(f"moe.backends.{name} has no HARDWARE_VERDICT to lift")
        module.HARDWARE_VERDICT = None
        print(f"unverified.py: {name}'s hardware verdict lifted for this run", file=sys.stderr)
    from moe.cli import main as cli

    return cli(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
