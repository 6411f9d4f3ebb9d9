"""Training and evaluation data: talking-head videos decoded once into a frame cache on disk.

Each video becomes one uint8 array [T, size, size, 3] (centre square crop, resized) stored as .npy
and memory-mapped, so an epoch never re-decodes video.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gemx.errors import GemxError
from gemx.frames import to_tensor

TEST_SPLIT = ("retalk5_woman_glasses", "liveportrait_d12_man_webcam", "styletalk_feifeili_clip1")
MIN_REFERENCE_GAP = 15  # the paper found references 15+ frames away better than neighbours


def split_videos(video_dir: Path | None) -> tuple[list[Path], list[Path]]:
    """(train, test) videos, split by person as the data README suggests."""
    if video_dir is None:
        raise GemxError("name the talking-head clips to use: pass --videos DIR (a folder of .mp4 videos)")
    videos = sorted(Path(video_dir).glob("*.mp4"))
    if not videos:
        raise GemxError(f"no .mp4 videos in {video_dir}; pass --videos DIR with talking-head clips")
    test = [v for v in videos if v.stem in TEST_SPLIT]
    train = [v for v in videos if v.stem not in TEST_SPLIT]
    return train, test or videos[-1:]


@dataclass
class Batch:
    target_hr: torch.Tensor  # [N, 3, S, S] in [0, 1]
    refs_hr: torch.Tensor  # [N, R, 3, S, S]


class ReferencePairs:
    """Samples (target, references) from the same video, references >= 15 frames away.

    Every batch is a pure function of (seed, step), so a resumed run sees exactly the batches an
    uninterrupted one would. `crop` trains on block-grid-aligned crops for speed; `mismatch` is the
    share of samples whose references come from a different video (a different person).
    """

    def __init__(self, clips: list[np.ndarray], crop: int, grid: int, refs: int = 1,
                 mismatch: float = 0.0, seed: int = 0):
        usable = [c for c in clips if len(c) > 2 * MIN_REFERENCE_GAP]
        if not usable:
            raise GemxError(f"training needs videos longer than {2 * MIN_REFERENCE_GAP} frames")
        if mismatch and len(usable) < 2:
            raise GemxError("mismatched-reference training needs at least two videos")
        self.clips, self.crop, self.grid, self.refs = usable, crop, grid, refs
        self.mismatch, self.seed = mismatch, seed
        lengths = np.array([len(c) for c in usable], dtype=float)
        self.weights = lengths / lengths.sum()

    def batch(self, step: int, batch_size: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        targets, refs = [], []
        for _ in range(batch_size):
            v = rng.choice(len(self.clips), p=self.weights)
            clip = self.clips[v]
            t = int(rng.integers(len(clip)))
            src = clip
            if self.mismatch and rng.random() < self.mismatch:
                src = self.clips[int(rng.choice([i for i in range(len(self.clips)) if i != v]))]
                ref_ids = rng.integers(len(src), size=self.refs)
            else:
                far = np.array([i for i in range(len(clip)) if abs(i - t) >= MIN_REFERENCE_GAP])
                ref_ids = rng.choice(far, size=self.refs)
            side = clip.shape[1]
            cells = (side - self.crop) // self.grid + 1
            y, x = (int(rng.integers(cells)) * self.grid for _ in range(2))
            k = int(rng.integers(4))  # random 90-degree rotation, the same for target and references
            crop = (slice(y, y + self.crop), slice(x, x + self.crop))
            targets.append(np.rot90(clip[t][crop], k))
            refs.append(np.stack([np.rot90(src[int(i)][crop], k) for i in ref_ids]))
        return Batch(to_tensor(np.stack(targets)), to_tensor(np.stack(refs)))
