"""``python -m bonedamage``: the command line, e.g. for ``torchrun -m bonedamage train-cnn``."""

import sys

from bonedamage.cli import main

if __name__ == "__main__":
    sys.exit(main())
