"""``python -m services.teacher ...`` = ``opd serve teacher ...``."""

from common.cli import main

if __name__ == "__main__":
    import sys

    raise SystemExit(main(["serve", "teacher", *sys.argv[1:]]))
