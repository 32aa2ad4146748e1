"""``python -m preshard_dev.emulator``: the emulator as its own process."""

import sys

from preshard_dev.emulator.server import main

sys.exit(main())
