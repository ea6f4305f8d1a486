"""``python -m services.router ...`` = ``opd serve router ...``."""

from common.cli import main

if __name__ == "__main__":
    import sys

    raise SystemExit(main(["serve", "router", *sys.argv[1:]]))
