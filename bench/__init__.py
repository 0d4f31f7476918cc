"""The benchmarks: `python -m bench.generate | bench.eval | bench.train | bench.study` (see each docstring)."""
