"""``python -m benchmarks.e2e``: see :mod:`benchmarks.e2e`."""
from .cli import main

main()
