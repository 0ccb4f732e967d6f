"""A procedural text-to-video world with exact ground truth, and an evaluator that mirrors VBench.

Prompts such as ``"a red circle moving left on a dark background"`` (3 shapes x 5 colours x 4
directions x 2 backgrounds = 120 prompts) and the clips that match them are generated here, so the
truth of every prompt is known and generated clips can be scored offline, exactly, on five
dimensions named after VBench's:

* ``subject_consistency``: the object keeps its identity over frames: 1 - the mean relative change
  of (area, mean colour) of the foreground, frame to frame and against the first frame (VBench's DINO
  score also mixes the previous and the first frame).
* ``aesthetic_quality`` (clean background): 1 - the mean absolute deviation of the background pixels
  from the prompt's background colour (per channel, in [0, 1]).
* ``imaging_quality`` (sharp and noise-free): the contrast between the object and the background
  relative to the ground truth's, times exp(-10 x the background's mean absolute deviation from its
  median colour).
* ``overall_consistency`` (matches the prompt): the mean of three checks: nearest palette colour of the
  foreground == the prompt's colour; dominant axis and sign of the centroid motion == the prompt's
  direction; bounding-box fill ratio nearest to the prompt's shape (circle pi/4, square 1, triangle 1/2).
* ``motion_smoothness``: 1 - mean |second difference| / mean |first difference| of the centroid track
  (sub-pixel centroids: pixels weighted by their distance from the background colour).

All five are in [0, 1]; a clip rendered by :func:`render` scores at or near 1 (tested), and corrupted
clips score lower (tested per dimension).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.8, 0.2), "blue": (0.2, 0.35, 0.95),
           "yellow": (0.95, 0.9, 0.15), "white": (0.95, 0.95, 0.95)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUNDS = {"dark": (0.08, 0.08, 0.12), "gray": (0.45, 0.45, 0.45)}
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
DIMENSIONS = ("subject_consistency", "aesthetic_quality", "imaging_quality", "overall_consistency",
              "motion_smoothness")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    direction: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} background"

    @classmethod
    def parse(cls, prompt: str) -> Scene:
        """The scene of a prompt of this world (``ValueError`` for any other prompt)."""
        words = prompt.lower().replace(",", " ").split()
        pick = {}
        for name, options in (("shape", SHAPES), ("colour", COLOURS), ("direction", DIRECTIONS),
                              ("background", BACKGROUNDS)):
            found = [w for w in words if w in options]
            if len(found) != 1:
                raise ValueError(f"not a procedural prompt (no single {name}): {prompt!r}")
            pick[name] = found[0]
        return cls(**pick)


def all_scenes() -> list[Scene]:
    return [Scene(*combo) for combo in itertools.product(SHAPES, COLOURS, DIRECTIONS, BACKGROUNDS)]


def render(scene: Scene, frames: int = 9, size: int = 32, radius: float = 0.25, travel: float = 0.45,
           jitter: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The clip of ``scene``: float32 ``[frames, size, size, 3]`` in [0, 1], anti-aliased by 4x supersampling."""
    sub = 4
    grid = (np.arange(size * sub) + 0.5) / (size * sub)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    dx, dy = DIRECTIONS[scene.direction]
    start = np.array([0.5 - dx * travel / 2 + jitter[0], 0.5 - dy * travel / 2 + jitter[1]])
    background = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    colour = np.array(COLOURS[scene.colour], dtype=np.float32)
    clip = np.empty((frames, size, size, 3), dtype=np.float32)
    for f in range(frames):
        cx, cy = start + np.array([dx, dy]) * travel * f / max(1, frames - 1)
        u, v = (xx - cx) / radius, (yy - cy) / radius
        if scene.shape == "circle":
            inside = u**2 + v**2 <= 1.0
        elif scene.shape == "square":
            inside = (np.abs(u) <= 0.886) & (np.abs(v) <= 0.886)  # same area as the circle
        else:
            inside = (v <= 0.8) & (v >= -1.2 + 2 * np.abs(u) * 1.0)  # apex up
        cover = inside.reshape(size, sub, size, sub).mean(axis=(1, 3))[..., None]
        clip[f] = background * (1 - cover) + colour * cover
    return clip


@dataclass(frozen=True)
class Track:
    areas: np.ndarray
    colours: np.ndarray
    centroids: np.ndarray
    fills: np.ndarray
    background_pixels: list[np.ndarray]
    foreground_found: np.ndarray


def _track(clip: np.ndarray, background: np.ndarray, threshold: float = 0.25) -> Track:
    areas, colours, centroids, fills, bg_pixels, found = [], [], [], [], [], []
    for frame in clip:
        distance = np.abs(frame - background).max(axis=-1)
        mask = distance > threshold
        bg_pixels.append(frame[~mask])
        if mask.sum() < 2:
            areas.append(0.0)
            colours.append(np.full(3, np.nan))
            centroids.append(np.full(2, np.nan))
            fills.append(np.nan)
            found.append(False)
            continue
        ys, xs = np.nonzero(mask)
        areas.append(mask.mean())
        colours.append(frame[mask].mean(axis=0))
        # sub-pixel centroid: every pixel weighted by its distance from the background colour
        weights = np.where(distance > 0.05, distance, 0.0)
        gy, gx = np.mgrid[0:frame.shape[0], 0:frame.shape[1]]
        centroids.append(np.array([(gx * weights).sum(), (gy * weights).sum()]) / weights.sum() / frame.shape[1])
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(mask.sum() / box)
        found.append(True)
    return Track(np.array(areas), np.array(colours), np.array(centroids), np.array(fills), bg_pixels,
                 np.array(found))


def score_clip(clip: np.ndarray, prompt: str) -> dict[str, float]:
    """The five scores of one clip ``[frames, H, W, 3]`` in [0, 1] for its procedural prompt."""
    scene = Scene.parse(prompt)
    background = np.array(BACKGROUNDS[scene.background])
    track = _track(np.asarray(clip, dtype=np.float64), background)
    found = track.foreground_found
    if found.sum() < 2:
        bg = np.concatenate([p.reshape(-1, 3) for p in track.background_pixels])
        clean = float(max(0.0, 1.0 - np.abs(bg - background).mean()))
        return {"subject_consistency": 0.0, "aesthetic_quality": clean, "imaging_quality": 0.0,
                "overall_consistency": 0.0, "motion_smoothness": 0.0}
    areas, colours, centroids = track.areas[found], track.colours[found], track.centroids[found]

    def relative_change(a, b):
        return np.abs(a - b).mean() / (np.abs(b).mean() + 1e-6)

    changes = [0.5 * (relative_change(areas[i], areas[j]) + relative_change(colours[i], colours[j]))
               for i in range(1, len(areas)) for j in (i - 1, 0)]
    subject = float(np.clip(1.0 - np.mean(changes), 0.0, 1.0)) * found.mean()
    bg = np.concatenate([p.reshape(-1, 3) for p in track.background_pixels])
    if len(bg) == 0:  # nothing looks like the background: no clean background, no contrast to speak of
        bg = np.ones((1, 3))
    aesthetic = float(max(0.0, 1.0 - np.abs(bg - background).mean()))
    target = np.array(COLOURS[scene.colour])
    contrast = np.abs(colours.mean(axis=0) - background).max() / np.abs(target - background).max()
    noise = np.abs(bg - np.median(bg, axis=0)).mean()  # robust: anti-aliased edge pixels barely move it
    imaging = float(np.clip(contrast, 0.0, 1.0) * math.exp(-10.0 * noise))
    palette = {name: np.array(rgb) for name, rgb in COLOURS.items()}
    colour_ok = min(palette, key=lambda n: np.abs(palette[n] - colours.mean(axis=0)).sum()) == scene.colour
    motion = centroids[-1] - centroids[0]
    axis = int(np.argmax(np.abs(motion)))
    dx, dy = DIRECTIONS[scene.direction]
    want_axis = 0 if dx else 1
    direction_ok = axis == want_axis and np.sign(motion[axis]) == (dx if dx else dy)
    fill = np.nanmedian(track.fills[found])
    shape_ok = min(FILL, key=lambda s: abs(FILL[s] - fill)) == scene.shape
    overall = (int(colour_ok) + int(direction_ok) + int(shape_ok)) / 3.0  # ints: numpy bools add as OR
    steps = np.diff(centroids, axis=0)
    if len(steps) >= 2 and np.abs(steps).mean() > 1e-6:
        smooth = float(np.clip(1.0 - np.abs(np.diff(steps, axis=0)).mean() / np.abs(steps).mean(), 0.0, 1.0))
    else:
        smooth = 0.0
    return {"subject_consistency": subject, "aesthetic_quality": aesthetic, "imaging_quality": imaging,
            "overall_consistency": float(overall), "motion_smoothness": smooth}
