"""``python -m bench._profiled_bot FILE.prof serve --config C``: the bot, profiled on demand.

SIGUSR1 starts cProfile (on the main thread, where the event loop runs), SIGUSR2 stops
it and writes FILE.prof, so start-up and warm-up stay out of the profile.
"""

from __future__ import annotations

import cProfile
import signal
import sys
from types import FrameType

from bot.cli import main

_profiler = cProfile.Profile()


def _start(signum: int, frame: FrameType | None) -> None:
    _profiler.enable()


def _stop(signum: int, frame: FrameType | None) -> None:
    _profiler.disable()
    _profiler.dump_stats(sys.argv[1])


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
    sys.exit(main(sys.argv[2:]))
