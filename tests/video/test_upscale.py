from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from gemx import GemxError
from gemx.frames import probe, read_frames, to_tensor
from gemx.metrics import psnr, ssim, ssim_db
from gemx.video.io import write_video
from gemx.video.references import select_diverse
from gemx.video.upscale import UpscaleOptions, upscale


def clip(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """A moving smooth pattern: a face-sized blob drifting over a gradient."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    frames = []
    for t in range(n):
        cx, cy = 0.5 + 0.2 * np.sin(t / 4), 0.5 + 0.1 * np.cos(t / 5)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) * 20)
        rgb = np.stack([blob, 0.5 * x + 0.3 * blob, y * (1 - blob)], -1) + rng.normal(0, 0.02, (size, size, 3))
        frames.append((rgb.clip(0, 1) * 255).astype(np.uint8))
    return frames


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    write_video(root / "hr.mp4", iter(clip(24, 64)), Fraction(12))
    write_video(root / "lr.mp4", iter([f[::4, ::4] for f in clip(10, 64, seed=1)]), Fraction(15))
    refs = root / "refs"
    refs.mkdir()
    for i, f in enumerate(clip(40, 64, seed=2)[::10]):
        Image.fromarray(f).save(refs / f"ref{i}.png")
    return root


def test_simulate_metrics_equal_a_direct_computation(videos, tiny_ckpt, tmp_path):
    out = tmp_path / "frames"
    result = upscale(videos / "hr.mp4", out, UpscaleOptions(simulate=True, refs=2, runtime="ort"), tiny_ckpt)
    assert result.frames == 24 and result.encoder_runs == 1 and len(result.reference_indices) == 2
    written = sorted(out.glob("frame_*.png"))
    assert len(written) == 24
    got = to_tensor(np.stack([np.asarray(Image.open(p)) for p in written]))
    original = to_tensor(read_frames(videos / "hr.mp4"))
    assert got.shape == original.shape == (24, 3, 64, 64)
    assert result.metrics["gemx"]["psnr"] == pytest.approx(float(psnr(got, original).mean()), abs=1e-4)
    assert result.metrics["gemx"]["ssim_db"] == pytest.approx(float(ssim_db(got, original).mean()), abs=1e-4)
    assert result.metrics["bicubic"]["psnr"] > 10


def test_the_metrics_match_their_closed_forms():
    """The metrics the simulate report uses, against values computed without them: two flat images' SSIM is the
    luminance term alone, (2ab + C1) / (a^2 + b^2 + C1); an image against itself is SSIM 1 (the dB scale's cap);
    PSNR of a uniform error d is -20 log10 d."""
    a, b, c1 = 0.2, 0.6, 0.01**2
    flat_a, flat_b = torch.full((1, 3, 32, 32), a), torch.full((1, 3, 32, 32), b)
    assert float(ssim(flat_a, flat_b)[0]) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-3)  # float32 variances
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert float(ssim(x, x)[0]) == pytest.approx(1, abs=1e-5) and float(ssim_db(x, x)[0]) > 40
    assert float(psnr(x, (x + 0.1))[0]) == pytest.approx(20, abs=1e-3)
    assert float(ssim(x, x.flip(-1))[0]) < 0.2  # a different picture of the same statistics is not similar


def test_lr_video_with_reference_images_keeps_count_fps_and_upscales(videos, tiny_ckpt, tmp_path):
    out = tmp_path / "out.mp4"
    result = upscale(videos / "lr.mp4", out, UpscaleOptions(references=videos / "refs", refs=3, runtime="torch"), tiny_ckpt)
    info = probe(out)
    assert (info.width, info.height, info.fps) == (64, 64, Fraction(15))
    assert len(read_frames(out)) == 10 == result.frames
    assert result.encoder_runs == 1


def test_side_by_side_has_three_panels_and_auto_says_what_it_measured_and_chose(videos, tiny_ckpt, tmp_path):
    out = tmp_path / "sbs"
    result = upscale(videos / "hr.mp4", out, UpscaleOptions(simulate=True, refs=1, side_by_side=True), tiny_ckpt)
    assert np.asarray(Image.open(out / "frame_00000.png")).shape == (64, 192, 3)
    # the default runtime is auto: it measured the fp32 runtimes here and ran the fastest
    assert result.precision == "fp32" and result.choice.startswith(("ort fp32: fastest of", "openvino fp32: fastest of"))
    assert "fastest of" in result.choice and "allowed down to fp32" in result.choice


def test_errors_are_clear(videos, tiny_ckpt, tmp_path):
    existing = tmp_path / "exists.mp4"
    existing.write_bytes(b"mine")
    with pytest.raises(GemxError, match="already exists; pass --force"):
        upscale(videos / "hr.mp4", existing, UpscaleOptions(simulate=True), tiny_ckpt)
    assert existing.read_bytes() == b"mine"
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(GemxError, match=r"cannot read video .*bad\.mp4"):
        upscale(bad, tmp_path / "o.mp4", UpscaleOptions(simulate=True), tiny_ckpt)
    with pytest.raises(GemxError, match="needs high-resolution references"):
        upscale(videos / "lr.mp4", tmp_path / "o.mp4", UpscaleOptions(), tiny_ckpt)
    with pytest.raises(GemxError, match="do not exist"):
        upscale(videos / "lr.mp4", tmp_path / "o.mp4", UpscaleOptions(references=tmp_path / "none"), tiny_ckpt)
    assert not (tmp_path / "o.mp4").exists()


def test_reference_selection_is_diverse_and_spaced():
    frames = clip(90, 32)
    picked = select_diverse(frames, 5)
    assert len(picked) == 5 and picked[0] == 0
    assert min(np.diff(picked)) >= 15
    assert select_diverse(frames[:5], 3) == sorted(set(select_diverse(frames[:5], 3)))  # short clips still give 3


def test_torch_and_session_outputs_match_for_the_same_frames(videos, tiny_ckpt, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    upscale(videos / "hr.mp4", a, UpscaleOptions(simulate=True, refs=2, runtime="torch"), tiny_ckpt)
    upscale(videos / "hr.mp4", b, UpscaleOptions(simulate=True, refs=2, runtime="ort"), tiny_ckpt)
    fa = np.asarray(Image.open(a / "frame_00010.png"), dtype=int)
    fb = np.asarray(Image.open(b / "frame_00010.png"), dtype=int)
    assert np.abs(fa - fb).max() <= 1


@pytest.mark.data
def test_real_video_keeps_audio_frame_count_and_fps(tiny_ckpt, tmp_path):
    import av

    from tests.conftest import videos_or_skip

    video = videos_or_skip() / "retalk5_woman_glasses.mp4"
    out = tmp_path / "real.mp4"
    result = upscale(video, out, UpscaleOptions(simulate=True, refs=3, runtime="ort"), tiny_ckpt)
    src, dst = probe(video), probe(out)
    assert dst.has_audio and src.has_audio
    assert dst.fps == src.fps and result.frames == len(read_frames(video)) == len(read_frames(out))
    with av.open(str(out)) as c:
        assert c.streams.audio[0].codec_context.name == "aac"


def test_int8_upscale_stays_close_to_fp32_and_names_what_runs_it(videos, tiny_ckpt, tmp_path):
    """`gemx upscale --precision int8` (the tiny checkpoint calibrated on the clip itself): the same frames within the
    INT8 budget of FP32; precisions a runtime does not compute in are refused before any work."""
    fp32, int8 = tmp_path / "fp32", tmp_path / "int8"
    upscale(videos / "hr.mp4", fp32, UpscaleOptions(simulate=True, refs=2, runtime="ort"), tiny_ckpt)
    result = upscale(videos / "hr.mp4", int8, UpscaleOptions(simulate=True, refs=2, runtime="ort", precision="int8",
                                                              calib=[videos / "hr.mp4"]), tiny_ckpt)
    a, b = (to_tensor(np.stack([np.asarray(Image.open(p)) for p in sorted(d.glob("*.png"))])) for d in (fp32, int8))
    assert 35 < float(psnr(b, a).mean()) < 100 and result.frames == 24
    for runtime, precision in (("torch", "int8"), ("ort", "fp16")):
        with pytest.raises(GemxError, match=f"the {runtime} runtime does not run {precision}"):
            upscale(videos / "hr.mp4", tmp_path / "x", UpscaleOptions(simulate=True, runtime=runtime, precision=precision), tiny_ckpt)
    assert not (tmp_path / "x").exists()


def wide(n: int, h: int, w: int, seed: int = 0) -> list[np.ndarray]:
    """`clip` frames stretched to a landscape geometry."""
    return [np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in clip(n, 64, seed)]


def test_simulate_keeps_a_landscape_videos_geometry_cropping_to_the_scale(tiny_ckpt, tmp_path):
    """A 130x98 HR video (on no grid, and not a multiple of the scale 4): cropped by 2 columns and 2 rows to 128x96,
    the LR stream 32x24, the output 128x96 frame for frame, with its quality against the cropped original."""
    write_video(tmp_path / "wide.mp4", iter(wide(8, 98, 130)), Fraction(10))
    out = tmp_path / "frames"
    result = upscale(tmp_path / "wide.mp4", out, UpscaleOptions(simulate=True, refs=2, runtime="ort"), tiny_ckpt)
    assert result.size == (96, 128) and result.cropped == (2, 2) and result.frames == 8
    written = sorted(out.glob("frame_*.png"))
    assert len(written) == 8 and all(Image.open(p).size == (128, 96) for p in written)
    assert result.metrics["bicubic"]["psnr"] > 20  # against the cropped original: the geometry lines up (the tiny model is untrained)


def test_an_lr_video_becomes_its_size_times_the_scale_and_references_must_match(tiny_ckpt, tmp_path):
    write_video(tmp_path / "lr.mp4", iter([f[::4, ::4] for f in wide(6, 96, 160, seed=2)]), Fraction(10))  # 40x24
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, f in enumerate(wide(3, 96, 160, seed=3)):
        Image.fromarray(f).save(refs / f"r{i}.png")
    result = upscale(tmp_path / "lr.mp4", tmp_path / "out.mp4", UpscaleOptions(references=refs, refs=2, runtime="ort"), tiny_ckpt)
    info = probe(tmp_path / "out.mp4")
    assert (info.width, info.height) == (160, 96) and result.size == (96, 160) and result.frames == 6
    Image.fromarray(wide(1, 64, 64)[0]).save(refs / "other_camera.png")
    with pytest.raises(GemxError, match=r"other_camera.png is 64x64; references must be frames of the output's size 160x96"):
        upscale(tmp_path / "lr.mp4", tmp_path / "again.mp4", UpscaleOptions(references=refs, refs=2, runtime="ort"), tiny_ckpt)


def test_crop_square_keeps_the_papers_protocol(tiny_ckpt, tmp_path):
    write_video(tmp_path / "wide.mp4", iter(wide(6, 96, 160)), Fraction(10))
    result = upscale(tmp_path / "wide.mp4", tmp_path / "sq", UpscaleOptions(simulate=True, refs=2, runtime="ort", crop="square"),
                     tiny_ckpt)
    assert result.size == (64, 64) and result.cropped == (0, 0)
    with pytest.raises(GemxError, match="--crop must be one of native, square"):
        UpscaleOptions(crop="circle")
