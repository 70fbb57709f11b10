"""``python -m tailkd``: the ``tailkd`` command (`tailkd.cli.entry`), as ``python -m tailkd.cli`` is."""

import sys

from tailkd.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
