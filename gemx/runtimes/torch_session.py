"""Eager PyTorch: the reference every other backend is compared with."""

from __future__ import annotations

import numpy as np
import torch

from gemx.contract import Contract
from gemx.model.network import GeminoAttention, ReferenceCache
from gemx.runtimes.base import Session


class TorchSession(Session):
    name = "torch"

    def __init__(self, model: GeminoAttention, device: str = "cpu", max_refs: int | None = None,
                 max_size: tuple[int, int] | None = None):
        super().__init__(Contract(model.config), max_refs, max_size)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def _encode(self, references: np.ndarray) -> ReferenceCache:
        return self.model.encode_references(torch.from_numpy(references).to(self.device))

    def _stack(self, kvs: list[ReferenceCache]) -> ReferenceCache:
        return ReferenceCache([torch.cat(k) for k in zip(*(kv.keys for kv in kvs), strict=True)],
                              [torch.cat(v) for v in zip(*(kv.values for kv in kvs), strict=True)])

    @torch.inference_mode()
    def _decode(self, target_lr: np.ndarray, kv: ReferenceCache) -> np.ndarray:
        return self.model.attend_and_decode(torch.from_numpy(target_lr).to(self.device), kv).cpu().numpy()
