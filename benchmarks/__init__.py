"""Benchmarks of adacache-fx, run from the repository root as modules::

    python -m benchmarks.e2e            # end to end vs diffusers' caches on the reference model
    python -m benchmarks.overhead       # overhead of the rewrite
    python -m benchmarks.kernels        # the fused cache-metrics op
    python -m benchmarks.distributed    # sequence parallel, 1/2/4 processes
    python -m benchmarks.readme_results # the README's results section from benchmarks/results/

Results are committed under benchmarks/results/. Benchmarks import ``adacache_fx`` and
``examples`` (never the tests); the zoo coverage matrix (benchmarks/results/coverage.md) is
produced by the test zoo's runner, ``PYTHONPATH=tests python -m zoo.coverage``.
"""
