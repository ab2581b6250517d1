"""Entry point of the PyInstaller build (relay.spec): the `relay` console script."""

import sys

from relay.cli import main

if __name__ == "__main__":
    sys.exit(main())
