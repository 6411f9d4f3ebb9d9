"""Calibration: the FP32 graphs run over real frames, each quantized tensor's range kept in a range table.

ONNX Runtime's calibrator API (`create_calibrator`, `collect_data`, `compute_data`) does the measuring, MinMax over
the op types gemx quantizes (`gemx.int8.qdq.QUANTIZED_OPS`), so the table holds exactly what quantization reads.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from gemx.contract import Contract
from gemx.errors import GemxError
from gemx.frames import cached_frames, to_tensor
from gemx.int8.qdq import QUANTIZED_OPS
from gemx.int8.ranges import Calibration, RangeTable
from gemx.model.lr import downsample

CALIB_FRAMES = 48  # frame-graph samples over all calibration videos
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")


def calibration_videos(paths: list[Path]) -> list[Path]:
    """`--calib` values: videos, or folders holding videos (not searched recursively)."""
    videos = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES and f.is_file())
            if not found:
                raise GemxError(f"--calib {p}: the folder holds no videos ({', '.join(VIDEO_SUFFIXES)})")
            videos += found
        elif p.is_file():
            videos.append(p)
        else:
            raise GemxError(f"--calib {p} does not exist; name a talking-head video or a folder of them")
    return videos


def calibrate(fp32_paths: tuple[Path, Path], contract: Contract, videos: list[Path], checkpoint_sha256: str,
              progress=lambda msg: None) -> RangeTable:
    """Run the (constant-folded) FP32 graphs over frames of `videos` and keep the range of every quantized op's
    input and output, and of the keys and values the encoder writes.

    Frame-graph samples: CALIB_FRAMES targets spread over the videos, each attending to 1 or 2 other frames
    of its own video; encoder samples: those reference sets."""
    cfg = contract.config
    per_video = max(2, -(-CALIB_FRAMES // len(videos)))
    encoder_feeds, frame_feeds = [], []
    encoder = _cpu_session(fp32_paths[0])
    kv_names = [s.name for s in contract.kv]
    cache_amax = {s.name: 0.0 for s in contract.kv}
    for video in videos:
        progress(f"reading calibration frames of {video.name}")
        frames = cached_frames(video, cfg.size)
        if len(frames) < 3:
            raise GemxError(f"--calib {video}: {len(frames)} frames; calibration needs at least 3 per video")
        picks = np.linspace(0, len(frames) - 1, per_video + 2).round().astype(int)
        refs_hr = to_tensor(np.asarray(frames[picks[:2]])).numpy()
        targets = downsample(to_tensor(np.asarray(frames[picks[2:]])), cfg.scale).numpy()
        for i, target in enumerate(targets):
            refs = refs_hr[: 1 + i % 2]
            if i < 2:
                encoder_feeds.append({"references": refs})
            kv = dict(zip(kv_names, encoder.run(kv_names, {"references": refs}), strict=True))
            frame_feeds.append({"target_lr": target[None], **kv})
            cache_amax = {name: max(amax, float(np.abs(kv[name]).max())) for name, amax in cache_amax.items()}
    graphs = {}
    for spec, path, feeds in zip(contract.graphs, fp32_paths, (encoder_feeds, frame_feeds), strict=True):
        progress(f"calibrating {spec.name} on {len(feeds)} samples")
        graphs[spec.name] = _calibrated_ranges(path, feeds)
    graphs["reference_encoder"].update({name: (-amax, amax) for name, amax in cache_amax.items()})
    source = f"{len(videos)} video{'s' if len(videos) > 1 else ''}: {', '.join(v.name for v in videos)}"
    return RangeTable(checkpoint_sha256=checkpoint_sha256, block_size=cfg.block_size,
                      calibration=Calibration(source=source, frames=len(frame_feeds)), graphs=graphs)


def _calibrated_ranges(fp32_path: Path, feeds: list[dict]) -> dict[str, tuple[float, float]]:
    """ONNX Runtime's MinMax calibrator over `feeds`: the range of every float input and output of the op types
    quantization quantizes, which is the set its quantizer reads ranges for (`quantize_static` calibrates the same
    way when it is given no table)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory(prefix="gemx-calib-") as tmp:
        calibrator = create_calibrator(fp32_path, QUANTIZED_OPS, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax)
        calibrator.collect_data(Reader())
        data = calibrator.compute_data().data
        del calibrator  # its inference session holds the augmented graph in the folder
    return {t: (float(np.asarray(d.range_value[0]).item()), float(np.asarray(d.range_value[1]).item())) for t, d in data.items()}


def calibration_frames_needed(checkpoint: Path) -> GemxError:
    return GemxError(f"INT8 needs calibration frames for {Path(checkpoint).name}: pass --calib VIDEO|DIR "
                     "(real talking-head video of the kind you will serve)")


def _cpu_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
