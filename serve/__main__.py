"""``python -m serve``: see ``python -m serve --help``."""

import sys

from serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
