"""Checkpoints: weights, the model config and metadata in one file, loaded without unpickling code.

Format: a `torch.save` of plain data, {"format": "gemx-checkpoint", "version": 1, "config": {...},
"state_dict": {...}, "meta": {...}, optional "train_state": {...}}, read back with
`torch.load(weights_only=True)`, which refuses anything but tensors and primitive containers.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from gemx.errors import GemxError
from gemx.fs import atomic_write
from gemx.model.config import ModelConfig
from gemx.model.network import GeminoAttention, build_model

FORMAT = "gemx-checkpoint"
VERSION = 1
DEFAULT_CHECKPOINT = "small_x4.pt"


@dataclass
class Checkpoint:
    model: GeminoAttention
    meta: dict = field(default_factory=dict)
    train_state: dict | None = None
    path: Path | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def save_checkpoint(path: Path, model: GeminoAttention, meta: dict | None = None,
                    train_state: dict | None = None) -> None:
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    if train_state is not None:
        payload["train_state"] = train_state
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path | None = None) -> Checkpoint:
    """Load a gemx checkpoint; `None` loads the shipped default. Every failure is one clear GemxError."""
    path = default_checkpoint_path() if path is None else Path(path)
    if not path.exists():
        raise GemxError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise GemxError(f"checkpoint {path} is a directory; pass the .pt file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError, RuntimeError) as e:
        raise GemxError(f"checkpoint {path} is truncated or corrupt ({_first_line(e)}); re-download or re-train it") from None
    except Exception:  # weights_only refusing a pickled object, or an unknown file entirely
        raise GemxError(f"checkpoint {path} is not a gemx checkpoint: it is not a weights-only PyTorch file "
                        "(gemx loads only plain tensors and settings, never pickled code)") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise GemxError(f"{path} is not a gemx checkpoint (no '{FORMAT}' header); gemx loads checkpoints written by `gemx train`")
    _check_fields(path, payload)
    if payload.get("version", 0) > VERSION:
        raise GemxError(f"checkpoint {path} has format version {payload['version']}; this gemx reads up to {VERSION}, upgrade gemx")
    try:
        model = build_model(ModelConfig.from_dict(payload.get("config")))
    except GemxError as e:
        raise GemxError(f"checkpoint {path}: {e}") from None
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GemxError(f"checkpoint {path} has no state dict of tensors; gemx loads checkpoints written by `gemx train`")
    own = model.state_dict()
    wrong = next((k for k, v in state.items() if k in own and own[k].is_floating_point() and not v.is_floating_point()), None)
    if wrong is not None:
        raise GemxError(f"checkpoint {path} has non-floating weights ({wrong} is {str(state[wrong].dtype).removeprefix('torch.')}, "
                        f"the model needs floating point); gemx loads checkpoints written by `gemx train`")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a weight of the wrong shape
        raise GemxError(f"checkpoint {path} does not match its own config ({_first_line(e).split(': ', 1)[-1]})") from None
    if missing or unexpected:
        raise GemxError(f"checkpoint {path} does not match its own config (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise GemxError(f"checkpoint {path} has non-finite weights (NaN or Inf in {', '.join(bad[:3])}); "
                        "it cannot produce frames: use an earlier checkpoint of the run")
    model.eval()
    return Checkpoint(model, payload.get("meta", {}), payload.get("train_state"), path)


# Every top-level field but the config (ModelConfig checks its own) and the state dict (checked against the model):
# its types, and what a user reads when they are wrong. Fields that are absent take their defaults.
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "version": ((int,), "an integer"),
    "meta": ((dict,), "a mapping"),
    "train_state": ((dict, type(None)), "a mapping or empty"),
}
_TRAIN_STATE: dict[str, tuple[tuple[type, ...], str]] = {
    "step": ((int,), "an integer"),
    "optimizer": ((dict,), "a mapping"),
    "config": ((dict,), "a mapping"),
}


def _check_fields(path: Path, payload: dict) -> None:
    """Refuse metadata of the wrong type in one line, before anything compares or indexes it."""
    def check(where: str, value: object, types: tuple[type, ...], what: str) -> None:
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise GemxError(f"checkpoint {path}: {where} must be {what}, got {type(value).__name__} {value!r:.40}; "
                            "gemx loads checkpoints written by `gemx train`")

    for name, (types, what) in _FIELDS.items():
        if name in payload:
            check(f"'{name}'", payload[name], types, what)
    train = payload.get("meta", {}).get("train", {})
    check("'meta.train'", train, (dict,), "a mapping")
    if "wall_seconds" in train:
        check("'meta.train.wall_seconds'", train["wall_seconds"], (int, float), "a number")
    state = payload.get("train_state")
    if state is not None:
        for name, (types, what) in _TRAIN_STATE.items():
            check(f"'train_state.{name}'", state.get(name), types, what)
        for name in ("seed", "steps"):
            check(f"'train_state.config.{name}'", state["config"].get(name), (int,), "an integer")


def default_checkpoint_path() -> Path:
    path = Path(str(resources.files("gemx") / "checkpoints" / DEFAULT_CHECKPOINT))
    if not path.exists():
        raise GemxError("no default checkpoint is shipped with this install; pass a checkpoint path (train one with `gemx train`)")
    return path


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else type(e).__name__
