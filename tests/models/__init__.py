"""The tests' fixture models, in one place: hand-written toy DiTs (``toy_models``) and the
AdaCache paper's Open-Sora-style STDiT3 (``opensora_style``). The zoo of diffusers transformers
(``tests/zoo``, package ``zoo``) keeps its own package; the example models stay in ``examples/models``."""
