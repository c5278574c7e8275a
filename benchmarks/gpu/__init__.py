"""One-command GPU check of adacache-fx (``bash benchmarks/gpu/run.sh``); see README.md here."""
