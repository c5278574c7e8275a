"""Reference DiT models written for this project (used by examples, tests and benchmarks).

* :mod:`.dit`: the class-conditional DiT of Peebles & Xie (``self.blocks``).
* :mod:`.stdit`: an Open-Sora STDiT3-style video DiT (``self.spatial_blocks`` and
  ``self.temporal_blocks``).

Both trace into one Dynamo graph (``torch.compile(model, fullgraph=True)``) and provide
``init_random_(model, seed)`` to replace the identity-at-init (adaLN-Zero) weights with seeded
non-zero values so that every block produces a non-zero residual.
"""

from .dit import DiT, DiTBlock, init_random_
from .stdit import STDiT3, STDiT3Block

__all__ = ["DiT", "DiTBlock", "STDiT3", "STDiT3Block", "init_random_"]
