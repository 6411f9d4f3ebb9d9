"""What a model costs: parameters per part and FLOPs of reference encoding vs per-frame work."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from gemx.model.network import GeminoAttention


def parameter_counts(model: GeminoAttention) -> dict[str, int]:
    parts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    parts["temperatures"] = sum(p.numel() for n, p in model.named_parameters(recurse=False))
    parts["total"] = sum(p.numel() for p in model.parameters())
    return parts


def count_flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return int(counter.get_total_flops())


def describe(model: GeminoAttention, refs: int = 1) -> dict:
    """Config, parameters per part, FLOPs and key/value cache size at `refs` references.

    FLOPs count multiply-adds as 2 (torch's FlopCounterMode convention) over convolutions and matmuls.
    """
    cfg = model.config
    refs_hr = torch.rand(1, refs, 3, cfg.size, cfg.size)
    target = torch.rand(1, 3, cfg.lr_size, cfg.lr_size)
    with torch.no_grad():
        cache = model.encode_references(refs_hr)
    return {
        "config": cfg.to_dict(),
        "refs": refs,
        "parameters": parameter_counts(model),
        "flops": {
            "encode_references": count_flops(model.encode_references, refs_hr),
            "attend_and_decode": count_flops(model.attend_and_decode, target, cache),
        },
        "kv_cache_bytes": cache.nbytes(),
    }
