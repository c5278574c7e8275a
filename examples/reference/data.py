"""Procedural "moving shapes" videos: seeded, no downloads.

Every sample is one bright shape on a black background, 8 frames of 32x32 RGB, values in
[-1, 1] (channels-first video layout ``(3, F, H, W)``, the layout WanTransformer3DModel
takes). The attributes (colour, shape, motion, direction, speed) give the prompt and the
ground truth that the adherence evaluation checks generated videos against.

Motions, from low to high motion:
  static                          "red circle static"
  linear, slow / fast, 4 ways     "red circle moving right fast"
  bouncing (vertical), slow/fast  "red circle bouncing slow"
  growing / shrinking             "red circle growing"
Image coordinates: x to the right, y downwards, so "up" is decreasing y.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FRAMES = 8
SIZE = 32

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("static", "moving", "bouncing", "growing", "shrinking")
DIRECTIONS: dict[str, tuple[float, float]] = {  # unit (dx, dy) in image coordinates
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
SPEEDS: dict[str, float] = {"slow": 0.8, "fast": 2.0}  # pixels per frame (linear motion)
BOUNCES: dict[str, int] = {"slow": 1, "fast": 2}  # bounces per clip
# how often each motion is drawn in training
MOTION_WEIGHTS = {"static": 0.14, "moving": 0.52, "bouncing": 0.14, "growing": 0.10, "shrinking": 0.10}


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    motion: str
    direction: str | None = None  # only for "moving"
    speed: str | None = None  # for "moving" and "bouncing"

    @property
    def prompt(self) -> str:
        words = [self.colour, self.shape, self.motion]
        if self.motion == "moving":
            words.append(self.direction)
        if self.speed is not None:
            words.append(self.speed)
        return " ".join(words)

    @classmethod
    def from_prompt(cls, prompt: str) -> "ShapeSpec":
        w = prompt.lower().split()
        colour = next(x for x in w if x in COLOURS)
        shape = next(x for x in w if x in SHAPES)
        motion = next(x for x in w if x in MOTIONS)
        direction = next((x for x in w if x in DIRECTIONS), None) if motion == "moving" else None
        speed = next((x for x in w if x in SPEEDS), "slow") if motion in ("moving", "bouncing") else None
        return cls(colour, shape, motion, direction, speed)


def all_specs() -> list[ShapeSpec]:
    """Every attribute combination (6 colours x 3 shapes x 13 motions = 234 prompts)."""
    out = []
    for c in COLOURS:
        for s in SHAPES:
            out.append(ShapeSpec(c, s, "static"))
            for d in DIRECTIONS:
                for v in SPEEDS:
                    out.append(ShapeSpec(c, s, "moving", d, v))
            for v in BOUNCES:
                out.append(ShapeSpec(c, s, "bouncing", None, v))
            out.append(ShapeSpec(c, s, "growing"))
            out.append(ShapeSpec(c, s, "shrinking"))
    return out


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def random_spec(g: torch.Generator, motion_weights: dict[str, float] | None = None) -> ShapeSpec:
    weights = MOTION_WEIGHTS if motion_weights is None else motion_weights
    names = list(MOTION_WEIGHTS)
    w = torch.tensor([float(weights.get(n, 0.0)) for n in names])
    motion = names[torch.multinomial(w, 1, generator=g).item()]
    colour = list(COLOURS)[torch.randint(len(COLOURS), (), generator=g).item()]
    shape = SHAPES[torch.randint(len(SHAPES), (), generator=g).item()]
    direction = speed = None
    if motion == "moving":
        direction = list(DIRECTIONS)[torch.randint(4, (), generator=g).item()]
    if motion in ("moving", "bouncing"):
        speed = list(SPEEDS)[torch.randint(2, (), generator=g).item()]
    return ShapeSpec(colour, shape, motion, direction, speed)


def trajectory(spec: ShapeSpec, g: torch.Generator, frames: int = FRAMES, size: int = SIZE,
               start_spread: float = 1.0):
    """Per-frame centre (x, y) and radius, drawn at random but always inside the frame.

    ``start_spread`` < 1 narrows the start of linear motion along its axis to that fraction
    of the allowed range, the part nearest the edge it leaves (1: the whole range; the
    cross-axis start is not affected). The random draws are the same either way."""
    t = torch.arange(frames, dtype=torch.float32)
    if spec.motion in ("growing", "shrinking"):
        r0, r1 = _u(g, 2.0, 3.0), _u(g, 7.5, 9.0)
        if spec.motion == "shrinking":
            r0, r1 = r1, r0
        radius = r0 + (r1 - r0) * t / (frames - 1)
        m = max(r0, r1) + 1.5
        cx, cy = _u(g, m, size - m), _u(g, m, size - m)
        return torch.full_like(t, cx), torch.full_like(t, cy), radius
    r = _u(g, 3.5, 5.5)
    radius = torch.full_like(t, r)
    m = r + 1.5
    if spec.motion == "static":
        cx, cy = _u(g, m, size - m), _u(g, m, size - m)
        return torch.full_like(t, cx), torch.full_like(t, cy), radius
    if spec.motion == "moving":
        dx, dy = DIRECTIONS[spec.direction]
        dist = SPEEDS[spec.speed] * (frames - 1)
        # start so that the whole path stays inside [m, size - m]
        def start(d):
            span = start_spread * (size - 2 * m - dist)
            if d > 0:
                return _u(g, m, m + span)
            if d < 0:
                return _u(g, size - m - span, size - m)
            return _u(g, m, size - m)
        x0, y0 = start(dx), start(dy)
        return x0 + dx * SPEEDS[spec.speed] * t, y0 + dy * SPEEDS[spec.speed] * t, radius
    if spec.motion == "bouncing":
        n = BOUNCES[spec.speed]
        amp = _u(g, 9.0, 12.0)
        floor = _u(g, m + amp, size - m)
        cx = _u(g, m, size - m)
        y = floor - amp * torch.abs(torch.sin(math.pi * n * t / (frames - 1)))
        return torch.full_like(t, cx), y, radius
    raise ValueError(spec.motion)


def _coverage(shape: str, cx, cy, r, size: int) -> torch.Tensor:
    """Anti-aliased coverage (F, H, W) in [0, 1] from a signed distance (pixels)."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    px = xs[None] - cx[:, None, None]
    py = ys[None] - cy[:, None, None]
    rr = r[:, None, None]
    if shape == "circle":
        d = torch.sqrt(px**2 + py**2) - rr
    elif shape == "square":
        d = torch.maximum(px.abs(), py.abs()) - rr * 0.9
    elif shape == "triangle":  # apex up; edge normals at 90, 210, 330 degrees (y down)
        rt = rr * 1.35
        d = None
        for a in (90.0, 210.0, 330.0):
            nx, ny = math.cos(math.radians(a)), math.sin(math.radians(a))
            e = nx * px + ny * py - rt / 2
            d = e if d is None else torch.maximum(d, e)
        # put the centroid of the triangle on (cx, cy): its centroid is the circumcentre
    else:
        raise ValueError(shape)
    return (0.5 - d).clamp(0.0, 1.0)


def render(spec: ShapeSpec, g: torch.Generator, frames: int = FRAMES, size: int = SIZE,
           start_spread: float = 1.0):
    """One video ``(3, F, H, W)`` in [-1, 1] and its ground truth (centres, radii)."""
    cx, cy, r = trajectory(spec, g, frames, size, start_spread)
    cov = _coverage(spec.shape, cx, cy, r, size)  # (F, H, W)
    col = torch.tensor(COLOURS[spec.colour]).view(3, 1, 1, 1)
    video = cov[None] * col * 2.0 - 1.0
    return video, {"cx": cx, "cy": cy, "radius": r}


class MovingShapes:
    """Seeded stream of (video, prompt, spec) batches; same seed -> same batches."""

    def __init__(self, seed: int = 0, frames: int = FRAMES, size: int = SIZE, start_spread: float = 1.0,
                 motion_weights: dict[str, float] | None = None):
        if motion_weights is not None:
            unknown = set(motion_weights) - set(MOTIONS)
            if unknown or not any(v > 0 for v in motion_weights.values()) or min(motion_weights.values()) < 0:
                raise ValueError(f"motion_weights: non-negative weights of {MOTIONS} with one > 0, "
                                 f"got {motion_weights}")
        self.g = torch.Generator().manual_seed(seed)
        self.frames, self.size = frames, size
        self.start_spread = start_spread
        self.motion_weights = motion_weights

    def batch(self, batch_size: int):
        vids, specs = [], []
        for _ in range(batch_size):
            spec = random_spec(self.g, self.motion_weights)
            v, _ = render(spec, self.g, self.frames, self.size, self.start_spread)
            vids.append(v)
            specs.append(spec)
        return torch.stack(vids), [s.prompt for s in specs], specs
