"""Choosing reference frames: diverse, not neighbours.

Greedy farthest-point selection over small thumbnails: start from the first frame, then repeatedly
take the frame least like every frame already chosen, among frames at least `min_gap` apart from
them (the paper found references 15+ frames apart better than neighbouring ones). Different poses
and mouth shapes give the attention more to copy from than five near-identical frames.
"""

from __future__ import annotations

import numpy as np

MIN_GAP = 15


def thumbnail(frame: np.ndarray, side: int = 24) -> np.ndarray:
    h, w = frame.shape[:2]
    ys, xs = np.linspace(0, h - 1, side).astype(int), np.linspace(0, w - 1, side).astype(int)
    return frame[ys][:, xs].astype(np.float32).ravel() / 255


def select_diverse(frames: list[np.ndarray] | np.ndarray, n: int, min_gap: int = MIN_GAP) -> list[int]:
    """Indices of `n` mutually distant frames (fewer only if the clip has fewer frames)."""
    count = len(frames)
    n = min(n, count)
    thumbs = np.stack([thumbnail(f) for f in frames])
    chosen = [0]
    nearest = np.linalg.norm(thumbs - thumbs[0], axis=1)
    while len(chosen) < n:
        gap = min_gap
        while True:
            far = np.ones(count, bool)
            for c in chosen:
                far[max(0, c - gap + 1): c + gap] = False
            if far.any() or gap <= 1:
                break
            gap //= 2  # a short clip: relax the spacing rather than return fewer references
        candidates = np.where(far, nearest, -1.0)
        pick = int(candidates.argmax())
        if candidates[pick] < 0:
            break
        chosen.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(thumbs - thumbs[pick], axis=1))
    return sorted(chosen)
