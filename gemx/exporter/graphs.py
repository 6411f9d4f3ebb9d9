"""The two deployable graphs as torch modules, wrapping the model at its deployment seam.

Inputs and outputs follow the contract; the FP16 variants run the network in half precision with
explicit casts, so the precision is in the graph itself (TensorRT 11 builds strongly typed networks).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from gemx.contract import Contract
from gemx.model.network import GeminoAttention, ReferenceCache, cast


def _network_for(model: GeminoAttention, precision: str) -> GeminoAttention:
    return copy.deepcopy(model).half().eval() if precision == "fp16" else model.eval()


class ReferenceEncoderGraph(nn.Module):
    """references [refs, 3, H, W] in [0, 1] -> (key_i, value_i, ...) in the contract's layout and dtypes."""

    def __init__(self, model: GeminoAttention, contract: Contract):
        super().__init__()
        self.model = _network_for(model, contract.precision)
        self.dtypes = [getattr(torch, s.dtype) for s in contract.kv]
        self.compute = next(self.model.parameters()).dtype

    def forward(self, references: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = self.model.encode_references(cast(references, self.compute).unsqueeze(0))
        kv = [t for pair in zip(cache.keys, cache.values, strict=True) for t in pair]
        return tuple(cast(t, d) for t, d in zip(kv, self.dtypes, strict=True))


class FrameGraph(nn.Module):
    """target_lr [1, 3, H/s, W/s] + (key_i, value_i, ...) -> frame_hr [1, 3, H, W] in float32.

    `subpixel_head`: the decoder's head computed on 2x2 phases (`gemx.model.network.subpixel_head`), the source of
    the INT8 frame graph."""

    def __init__(self, model: GeminoAttention, contract: Contract, subpixel_head: bool = False):
        super().__init__()
        self.model = _network_for(model, contract.precision)
        self.compute = next(self.model.parameters()).dtype
        self.subpixel_head = subpixel_head

    def forward(self, target_lr: torch.Tensor, kv: tuple[torch.Tensor, ...]) -> torch.Tensor:
        cache = ReferenceCache(list(kv[0::2]), [cast(v, self.compute) for v in kv[1::2]])
        frame = self.model.attend_and_decode(cast(target_lr, self.compute), cache, self.subpixel_head)
        return cast(frame, torch.float32)
