"""Reference model for adacache-fx: a small WanTransformer3DModel trained on procedural
moving-shape videos (see examples/weights/MODEL_CARD.md)."""
from .data import MovingShapes, ShapeSpec, all_specs, render, COLOURS, SHAPES, DIRECTIONS, SPEEDS
from .tokenizer import PromptTokenizer, tokenize, VOCAB, MAX_TOKENS
from .model import (build_reference_model, load_reference_model, sample, make_scheduler, model_input,
                    coordinate_channels, DEFAULT_TRANSFORMER_CONFIG, WEIGHTS_FILE, CONFIG_FILE, VIDEO_SHAPE)

__all__ = [
    "MovingShapes", "ShapeSpec", "all_specs", "render", "COLOURS", "SHAPES", "DIRECTIONS", "SPEEDS",
    "PromptTokenizer", "tokenize", "VOCAB", "MAX_TOKENS",
    "build_reference_model", "load_reference_model", "sample", "make_scheduler", "model_input",
    "coordinate_channels",
    "DEFAULT_TRANSFORMER_CONFIG", "WEIGHTS_FILE", "CONFIG_FILE", "VIDEO_SHAPE",
]
