"""Side-by-side measurements; each writes benchmarks/results/<name>.json, `python -m benchmarks.report`
renders them into the docs. Run as `python benchmarks/X.py` or `python -m benchmarks.X`."""
