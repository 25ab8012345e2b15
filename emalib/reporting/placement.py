"""Readable figures: point labels placed where they cover no other label or point, and an axis range that shows
where most points are, with a far point drawn at the edge and its value written beside it."""

from __future__ import annotations

import math

# Offsets tried for a point's label, in points from the point: nearest first, then further out on the same
# directions, so a label stays next to its point unless every near spot is taken.
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
_RADII = (4, 9, 15, 22, 30)
_MARKER_HALF_PX = 4  # half the side of the box a point's marker is taken to cover, in pixels


def far_limit(values: list[float], keep: float = 0.0, whisker: float = 3.0) -> float | None:
    """The lower end of an axis that hides only far-out values: below Q1 - whisker * IQR ("far out" in Tukey's
    sense) of `values`. `keep` (e.g. 0, the no-defense line) stays in view. None when no value is that far out, or
    there are too few values to tell (fewer than four)."""
    finite = sorted(v for v in values if v is not None and not math.isnan(v))
    if len(finite) < 4:
        return None
    q1, q3 = _quantile(finite, 0.25), _quantile(finite, 0.75)
    fence = q1 - whisker * max(q3 - q1, 1e-9)
    inside = [v for v in finite if v >= fence]
    if len(inside) == len(finite):
        return None
    low, high = min(min(inside), keep), max(finite)
    return low - 0.08 * max(high - low, 1.0)


def _quantile(ordered: list[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def place_labels(axis, points: list[tuple[float, float, str]], fontsize: float = 7, obstacles=()) -> list:
    """Annotate each (x, y, text) in data coordinates (an empty text: no label) at the first offset where its text overlaps no label placed
    so far, no point's marker, no text in `obstacles`, and stays inside the axes; when none is free, the furthest
    offset with a thin leader line. Call it after the figure's layout is final (its boxes are in pixels)."""
    renderer = axis.figure.canvas.get_renderer()
    inside = axis.get_window_extent(renderer)
    taken = [text.get_window_extent(renderer) for text in obstacles if text.get_visible() and text.get_text()]
    markers = [_marker_box(axis, x, y) for x, y, _ in points]
    placed = []
    for x, y, text in points:
        if not text:  # a point without a label still keeps the others' labels off its marker
            continue
        chosen = None
        for radius in _RADII:
            for dx, dy in _DIRECTIONS:
                label = _annotation(axis, x, y, text, dx * radius, dy * radius, fontsize)
                box = label.get_window_extent(renderer)
                free = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
                if free and not any(box.overlaps(other) for other in [*taken, *markers]):
                    chosen = label
                    break
                label.remove()
            if chosen is not None:
                break
        if chosen is None:  # crowded: the furthest spot, tied to its point by a line
            chosen = _annotation(axis, x, y, text, _RADII[-1] * 1.5, _RADII[-1] * 1.5, fontsize, leader=True)
        taken.append(chosen.get_window_extent(renderer))
        placed.append(chosen)
    return placed


def _marker_box(axis, x: float, y: float):
    from matplotlib.transforms import Bbox

    px, py = axis.transData.transform((x, y))
    return Bbox.from_extents(px - _MARKER_HALF_PX, py - _MARKER_HALF_PX, px + _MARKER_HALF_PX, py + _MARKER_HALF_PX)


def _annotation(axis, x, y, text, dx, dy, fontsize, leader=False):
    horizontal = "left" if dx > 0 else "right" if dx < 0 else "center"
    vertical = "bottom" if dy > 0 else "top" if dy < 0 else "center"
    return axis.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                         ha=horizontal, va=vertical,
                         arrowprops={"arrowstyle": "-", "linewidth": 0.5, "color": "0.4"} if leader else None)
