"""One session interface for every backend (after Polygraphy's runners).

    with open_session("ort", export_dir) as session:
        session.set_references(refs)      # [R, 3, H, W] float32 in [0, 1]: encoded once, cached
        frame_hr = session(target_lr)     # [1, 3, H/s, W/s] -> [1, 3, H, W], cached keys/values reused

The base class owns every check a user can fail (shapes, reference counts, call order) so that each
backend adapter only implements `_encode` and `_decode`, and no error reaches the user from deep
inside a runtime.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from gemx.errors import GemxError
from gemx.exporter.contract import Contract
from gemx.frames import as_array

# Resampled frames overshoot [0, 1] a little (bicubic ringing); 0-255 pixels are far outside.
PIXEL_SLACK = 0.25


class Session(ABC):
    """Runs the split model: `set_references` once per reference set, then `__call__` per frame."""

    name: str = "session"

    def __init__(self, contract: Contract, max_refs: int | None):
        self.contract = contract
        self.max_refs = max_refs
        self.encoder_runs = 0  # how often references were encoded: caching means once per set
        self._kv: Any = None
        self.num_references = 0

    # -- what every backend implements ---------------------------------------------------------
    @abstractmethod
    def _encode(self, references: np.ndarray) -> Any:
        """Encode references into a backend-native key/value cache."""

    @abstractmethod
    def _decode(self, target_lr: np.ndarray, kv: Any) -> np.ndarray:
        """Run the per-frame graph on the cached keys/values; returns float32 [1, 3, H, W]."""

    def kv_nbytes(self) -> int:
        return self.kv_bytes(self.num_references)

    def close(self) -> None:
        self._kv = None

    # -- the interface ---------------------------------------------------------------------------
    def encode(self, references: np.ndarray) -> Any:
        """Check and encode one reference set into a key/value cache, without making it this session's own.

        A server holding many streams keeps one cache per stream and passes it to `decode`.
        """
        spec = self.contract.reference_encoder.inputs[0]
        references = as_array(references, "references")
        references = self._as_input(references, spec.concrete(len(references)) if np.ndim(references) == 4 else None,
                                    "references", "[refs, 3, H, W]")
        r = references.shape[0]
        if r == 0:
            raise GemxError("no references given; pass at least one high-resolution reference frame")
        if self.max_refs is not None and r > self.max_refs:
            raise GemxError(f"{r} references exceed the {self.max_refs} this {self.name} session was exported/built for; "
                            f"use at most {self.max_refs}, or re-export with --max-refs {r} (and rebuild)")
        kv = self._encode(references)
        self.encoder_runs += 1
        return kv

    def decode(self, target_lr: np.ndarray, kv: Any) -> np.ndarray:
        """One frame against a cache from `encode`."""
        spec = self.contract.frame.inputs[0]
        self._check_cache(kv)
        target_lr = as_array(target_lr, "target_lr")
        return self._decode(self._as_input(target_lr, spec.concrete(1), "target_lr", "[1, 3, h, w]"), kv)

    def _check_cache(self, kv: Any) -> None:
        """A host cache (name -> array) must be of this session's contract: one made by a session of another
        precision (an INT8 session's values are int8) is refused in one line, not by the runtime's type error."""
        if not isinstance(kv, dict):
            return  # a runtime's own cache object (device buffers, a torch ReferenceCache)
        for spec in self.contract.kv:
            value = kv.get(spec.name)
            if isinstance(value, np.ndarray) and value.dtype != np.dtype(spec.dtype):
                raise GemxError(f"this {self.contract.precision} session takes {spec.name} as {spec.dtype}, got {value.dtype}: "
                                "use a cache encoded by a session of the same precision")

    def set_references(self, references: np.ndarray) -> None:
        references = as_array(references, "references")
        self._kv = self.encode(references)
        self.num_references = len(references)

    def __call__(self, target_lr: np.ndarray) -> np.ndarray:
        if self._kv is None:
            raise GemxError("no references set: call set_references(frames) before running frames")
        return self.decode(target_lr, self._kv)

    def kv_bytes(self, refs: int) -> int:
        """Bytes of one cache of `refs` references, from the contract."""
        return self.contract.kv_bytes(refs)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _as_input(x: np.ndarray, want: tuple[int, ...] | None, name: str, layout: str) -> np.ndarray:
        x = np.asarray(x)
        if want is None or x.shape != want:
            raise GemxError(f"{name} must be float32 {layout} = {list(want) if want else layout}, got shape {list(x.shape)}")
        if not np.issubdtype(x.dtype, np.floating):
            raise GemxError(f"{name} must be float32 in [0, 1], got {x.dtype} (divide 8-bit pixels by 255)")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise GemxError(f"{name} holds NaN or Inf values; send float32 pixels in [0, 1]")
        if x.size and (x.min() < -PIXEL_SLACK or x.max() > 1 + PIXEL_SLACK):
            raise GemxError(f"{name} has values in [{x.min():.3g}, {x.max():.3g}]; send float32 pixels in [0, 1] "
                            "(divide 8-bit pixels by 255)")
        return x

def missing_backend(what: str, extra: str = "gpu") -> GemxError:
    return GemxError(f"{what}; install it with: pip install 'gemx[{extra}]'" if extra else what)


class SessionModel:
    """A session seen through the PyTorch model's split interface (`encode_references`, `attend_and_decode`), so
    code written for the model, such as `gemx eval`'s quality table, measures a deployed graph unchanged."""

    def __init__(self, session: Session, config):
        self.session, self.config = session, config

    def encode_references(self, refs_hr):
        import torch

        refs = refs_hr[0] if refs_hr.dim() == 5 else refs_hr
        return self.session.encode(refs.to(torch.float32).numpy())

    def attend_and_decode(self, target_lr, cache):
        import torch

        return torch.from_numpy(self.session.decode(target_lr.to(torch.float32).numpy(), cache))
