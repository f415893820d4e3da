"""The benchmark harness: named scenarios, run as `python -m bench <scenario>`.

Each scenario is one module with `add_arguments(parser)` and `run(args, command) -> int`;
`bench.cli` lists them. Shared pieces: `stats` (percentiles, medians across repetitions),
`measure` (timing steps one at a time, paced or back-to-back), `report` (machine info,
markdown and JSON output). Figures and how to reproduce them are in bench/RESULTS.md.
"""
