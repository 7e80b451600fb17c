"""`speckle-rec`: the command-line front end, a thin layer over the speckle_rec library.

Exit codes: 0 ok, 1 runtime error (one line naming the file and the problem; ``--debug`` shows the
traceback), 2 usage error. Logs and progress bars go to stderr, results to stdout or files.
"""

import argparse
import sys

from speckle_rec import __version__
from speckle_rec.errors import SpeckleRecError

from . import commands


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--threads", type=int, default=None, metavar="K",
                        help="threads for Numba and OpenCV (default: all cores)")
    parser = argparse.ArgumentParser(
        prog="speckle-rec",
        description="Classical trackerless 3D freehand ultrasound reconstruction (TUS-REC contract).",
    )
    parser.add_argument("--version", action="version", version=f"speckle-rec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in commands.REGISTRY:
        register(sub, common)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from speckle_rec.threads import set_threads

        set_threads(args.threads)
        return int(args.run(args) or 0)
    except SpeckleRecError as exc:
        if args.debug:
            raise
        print(f"speckle-rec {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"speckle-rec {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns any failure into one line
        if args.debug:
            raise
        print(
            f"speckle-rec {args.command}: error: {exc.__class__.__name__}: {exc} (rerun with --debug for details)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
