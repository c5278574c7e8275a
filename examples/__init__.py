"""Examples of adacache-fx: the reference models (``examples.models``), the shipped reference
video model (``examples.reference``, weights in ``examples/weights``) and the scripts, run from
the repository root as modules::

    python -m examples.generate "blue square moving left fast"
    python -m examples.train_reference --out examples/weights
    python -m examples.reference.evaluate --n 52 --steps 30 --guidance 3.0
"""
