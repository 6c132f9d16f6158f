"""``python -m bot`` is ``ecashbot``."""

import sys

from bot.cli import main

sys.exit(main())
