"""Run the ``moe`` CLI with the hardware verdicts of the named backends lifted, for the first measurements
of a backend whose GPU parity test has just passed in the same call (its off switch, ``HARDWARE_VERDICT``,
is flipped in the source only once those numbers are in).

    python3 benchmarks/unverified.py sonic -- bench --preset dsv3 --backends triton,sonic
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if "--" not in argv:
        raise SystemExit("usage: unverified.py BACKEND[,BACKEND...] -- MOE_ARGS...")
    split = argv.index("--")
    from moe.testing import lift_hardware_verdict

    for name in ",".join(argv[:split]).split(","):
        lift_hardware_verdict(name)
        print(f"unverified.py: {name}'s hardware verdict lifted for this run", file=sys.stderr)
    from moe.cli import main as cli

    return cli(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
