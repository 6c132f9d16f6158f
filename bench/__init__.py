"""ecashbot's benchmark suite: ``uv run python -m bench [--quick]``.

Starts a nutshell mint, the Gemini emulator, a Nostr relay and the bot (as its own OS
process) on 127.0.0.1, measures latency, throughput, CPU and memory, and writes
``bench/RESULTS.md``. See :mod:`bench.run` for what each metric means.
"""
