"""`gemx upscale`: a low-resolution stream plus a few HR reference frames -> a high-resolution stream.

Frame geometry: the video's own. A W x H low-resolution video becomes a (W*s) x (H*s) one, and references must
be frames of that size (the same camera); with --simulate, a W x H high-resolution video is cropped by at most
s-1 pixels to multiples of the scale s, its LR stream synthesised, and the output is that size. The session pads
frames off the model's block grid and crops them back. `crop="square"` keeps the paper's protocol instead: every
frame centre-cropped to a square and resized (Lanczos) to the model's training size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from gemx.errors import GemxError, check_positive
from gemx.frames import iter_frames, probe, square_crop_resize, to_tensor, to_uint8
from gemx.fs import atomic_dir, refuse_foreign
from gemx.metrics import psnr, ssim_db
from gemx.model.checkpoint import load_checkpoint
from gemx.model.lr import downsample, upsample_bicubic
from gemx.video.io import write_video
from gemx.video.references import select_diverse

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CROPS = ("native", "square")


@dataclass
class UpscaleOptions:
    references: Path | None = None  # images, a directory of images, or a video; with --simulate: the input itself
    refs: int = 5
    runtime: str = "auto"
    simulate: bool = False
    side_by_side: bool = False
    force: bool = False
    threads: int | None = None
    precision: str = "fp32"  # int8 on ort/tensorrt, fp16 on the GPU runtimes
    calib: list[Path] = field(default_factory=list)  # INT8 calibration videos (the shipped checkpoint needs none)
    crop: str = "native"  # "native": the video's geometry; "square": centre square at the training size (the paper's)

    def __post_init__(self) -> None:
        check_positive(refs=self.refs, threads=self.threads)
        if self.crop not in CROPS:
            raise GemxError(f"--crop must be one of {', '.join(CROPS)}, got {self.crop!r}")


@dataclass
class UpscaleResult:
    output: Path
    frames: int
    fps: Fraction
    size: tuple[int, int]  # of the output frames (height, width)
    runtime: str
    reference_indices: list[int]
    reference_source: str
    encoder_runs: int
    metrics: dict = field(default_factory=dict)  # with --simulate: {"gemx": {...}, "bicubic": {...}}
    cropped: tuple[int, int] = (0, 0)  # rows and columns cut from the input to reach multiples of the scale
    precision: str = "fp32"  # what the session computed in
    choice: str | None = None  # with --runtime auto: what it measured and why it chose this runtime and precision


def upscale(input_path: Path, output: Path, opts: UpscaleOptions, ckpt_path: Path | None = None,
            progress=lambda done, total: None, status=lambda msg: None, session=None) -> UpscaleResult:
    """Upscale a video in this process, or through `session`: anything with the Session interface and a
    contract (e.g. a stream on a gemx server), which then decides the model geometry."""
    input_path, output = Path(input_path), Path(output)
    as_frames = output.suffix == ""
    _check_output(output, opts.force)
    info = probe(input_path)
    ckpt = load_checkpoint(ckpt_path) if session is None else None
    cfg = ckpt.config if session is None else session.contract.config
    square = opts.crop == "square"
    hr_frames, cropped = None, (0, 0)
    if opts.simulate:
        status("reading the high-resolution input")
        if square:
            hr_frames = [square_crop_resize(f, cfg.size) for f in iter_frames(input_path)]
        else:  # to multiples of the scale, cutting at most scale-1 rows and columns (right and bottom)
            hr_frames = [f[: f.shape[0] - f.shape[0] % cfg.scale, : f.shape[1] - f.shape[1] % cfg.scale] for f in iter_frames(input_path)]
        if not hr_frames:
            raise GemxError(f"{input_path} contains no decodable frames")
        out_size = hr_frames[0].shape[:2]
        if not square:
            cropped = (info.height - out_size[0], info.width - out_size[1])
        ref_pool, ref_source = hr_frames, f"{input_path.name} (simulated receiver)"
    else:
        if opts.references is None:
            raise GemxError("upscaling needs high-resolution references of the same person: pass --references "
                            "(images, a folder of images, or a video), or --simulate to make the LR stream from an HR video")
        out_size = (cfg.size, cfg.size) if square else (info.height * cfg.scale, info.width * cfg.scale)
        ref_pool, ref_source = _read_references(Path(opts.references), out_size, square), str(opts.references)
    indices = select_diverse(ref_pool, opts.refs)
    references = to_tensor(np.stack([ref_pool[i] for i in indices])).numpy()

    if session is None:
        status("preparing the runtime")
        session = _open(ckpt, opts, len(indices), status)
    session.set_references(references)
    status("upscaling")
    total = len(hr_frames) if hr_frames is not None else info.frames
    scores: dict[str, dict[str, list[float]]] = {"gemx": {"psnr": [], "ssim_db": []}, "bicubic": {"psnr": [], "ssim_db": []}}

    def results() -> Iterator[np.ndarray]:
        source = hr_frames if hr_frames is not None else (square_crop_resize(f, cfg.lr_size) if square else f
                                                           for f in iter_frames(input_path))
        for i, frame in enumerate(source):
            if hr_frames is not None:
                lr = downsample(to_tensor(frame)[None], cfg.scale)
            else:
                lr = to_tensor(frame)[None]
            out = torch.from_numpy(session(lr.numpy()))
            bicubic = upsample_bicubic(lr, cfg.scale)
            result, bicubic_u8 = to_uint8(out)[0], to_uint8(bicubic)[0]
            if hr_frames is not None:
                _score(scores, frame, result, bicubic_u8)
            progress(i + 1, total)
            panels = [bicubic_u8, result] + ([frame] if hr_frames is not None else [])
            yield np.concatenate(panels, axis=1) if opts.side_by_side else result

    count = _write(output, results(), info.fps, None if as_frames else input_path, as_frames, opts.force)
    if count == 0:
        raise GemxError(f"{input_path} contains no decodable frames")
    metrics = {k: {m: float(np.mean(v)) for m, v in s.items()} for k, s in scores.items()} if opts.simulate else {}
    return UpscaleResult(output, count, info.fps, tuple(out_size), session.name, indices, ref_source, session.encoder_runs,
                         metrics, cropped, getattr(session, "precision", opts.precision),
                         str(session.choice) if getattr(session, "choice", None) else None)


def _score(scores: dict, original: np.ndarray, result: np.ndarray, bicubic: np.ndarray) -> None:
    """PSNR/SSIM-dB of the frames as written (uint8) against the original HR frame."""
    ref = to_tensor(original)[None]
    for name, img in (("gemx", result), ("bicubic", bicubic)):
        x = to_tensor(img)[None]
        scores[name]["psnr"].append(float(psnr(x, ref)[0]))
        scores[name]["ssim_db"].append(float(ssim_db(x, ref)[0]))


def _open(ckpt, opts: UpscaleOptions, refs: int, status):
    from gemx.contract import graph_precision
    from gemx.exporter.cache import cached_export
    from gemx.runtimes.registry import check_precision, open_session, resolve_runtime

    runtime = resolve_runtime(opts.runtime)
    if runtime != "auto":
        check_precision(runtime, opts.precision)
    if runtime == "torch":
        from gemx.runtimes.torch_session import TorchSession

        return TorchSession(ckpt.model)
    graphs = list(dict.fromkeys(["fp32", graph_precision(opts.precision)]))
    path, _ = cached_export(ckpt, ckpt.config.block_size, max(refs, 10), graphs, opts.calib, progress=status)
    if runtime == "auto":
        status("measuring the runtimes here (once per export and machine)")
    return open_session(runtime, path, opts.precision, threads=opts.threads, model=ckpt.model)


def _read_references(path: Path, size: tuple[int, int], square: bool) -> list[np.ndarray]:
    """Reference frames at the output's size (height, width): images or a video of the same camera; with `square`,
    centre-cropped and resized to the training size like the frames."""
    from PIL import Image

    if not path.exists():
        raise GemxError(f"references {path} do not exist")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise GemxError(f"{path} holds no reference images ({', '.join(IMAGE_SUFFIXES)})")
    if len(files) == 1 and files[0].suffix.lower() not in IMAGE_SUFFIXES:
        frames = [_at_size(f, size, square, f"reference video {path}") for f in iter_frames(files[0])]
        if not frames:
            raise GemxError(f"reference video {path} contains no decodable frames")
        return frames
    out = []
    for f in files:
        try:
            image = np.asarray(Image.open(f).convert("RGB"))
        except (OSError, Image.DecompressionBombError) as e:
            raise GemxError(f"cannot read reference image {f}: {e}") from None
        out.append(_at_size(image, size, square, f"reference image {f}"))
    return out


def _at_size(frame: np.ndarray, size: tuple[int, int], square: bool, what: str) -> np.ndarray:
    if square:
        return square_crop_resize(frame, size[0])
    if frame.shape[:2] != tuple(size):
        raise GemxError(f"{what} is {frame.shape[1]}x{frame.shape[0]}; references must be frames of the output's size "
                        f"{size[1]}x{size[0]} (the input's size times the scale), from the same camera")
    return frame


FRAMES_RECORD = ".gemx-frames.json"  # marks a folder of frames as gemx's own: --force may replace it


def _is_frames_dir(path: Path) -> bool:
    return (path / FRAMES_RECORD).is_file()


def _check_output(output: Path, force: bool) -> None:
    if output.suffix and output.suffix.lower() not in (".mp4", ".mkv", ".mov"):
        raise GemxError(f"output {output} must be a video (.mp4, .mkv, .mov) or a directory for PNG frames")
    if not output.exists():
        return
    if output.suffix == "" and not (output.is_dir() and (_is_frames_dir(output) or not any(output.iterdir()))):
        raise GemxError(f"{output} exists and is not a folder of gemx frames; choose another output (gemx will not replace it)")
    if output.suffix and output.is_dir():
        raise GemxError(f"cannot write {output}: it is a directory")
    if not force:
        raise GemxError(f"{output} already exists; pass --force to replace it or choose another output")
    refuse_foreign(output, "output")


def _write(output: Path, frames: Iterator[np.ndarray], fps: Fraction, audio_from: Path | None, as_frames: bool,
           force: bool) -> int:
    """The whole output or nothing: a video file, or a folder of PNG frames, moved into place when complete."""
    if not as_frames:
        return write_video(output, frames, fps, audio_from=audio_from, overwrite=force)
    from PIL import Image

    count = 0
    replaceable = lambda p: force and (_is_frames_dir(p) or (p.is_dir() and not any(p.iterdir())))  # noqa: E731
    try:
        with atomic_dir(output, replaceable=replaceable) as tmp:
            for count, frame in enumerate(frames, start=1):
                Image.fromarray(frame).save(tmp / f"frame_{count - 1:05d}.png")
            if count == 0:
                raise _NoFrames
            (tmp / FRAMES_RECORD).write_text(json.dumps({"frames": count, "fps": str(fps)}) + "\n")
    except _NoFrames:
        return 0
    return count


class _NoFrames(Exception):
    pass
