from fractions import Fraction

import pytest
import torch

from gemx import GemxError
from gemx.frames import cached_frames
from gemx.model import build_model, load_checkpoint, preset
from gemx.train.data import ReferencePairs
from gemx.train.evaluate import evaluate
from gemx.train.loop import TrainConfig, train, warm_start
from gemx.video.io import write_video
from tests.video.test_upscale import clip


@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for i in range(3):
        write_video(root / f"person{i}.mp4", iter(clip(70, 64, seed=i)), Fraction(25))
    return sorted(root.glob("*.mp4"))


CFG = TrainConfig(steps=4, batch_size=2, crop=32, checkpoint_every=2, threads=1)


def test_a_few_steps_write_a_loadable_checkpoint_with_training_info(tiny_videos, tmp_path):
    out = train(preset("tiny"), CFG, tiny_videos, tmp_path / "m.pt")
    ckpt = load_checkpoint(out)
    assert ckpt.meta["train"]["steps_done"] == 4 and "L1" in ckpt.meta["train"]["loss"]
    assert ckpt.train_state is None  # a finished run


def test_interrupted_run_resumes_to_the_same_weights(tiny_videos, tmp_path):
    straight = load_checkpoint(train(preset("tiny"), CFG, tiny_videos, tmp_path / "a.pt")).model

    def stop_after_three(step, total, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(preset("tiny"), CFG, tiny_videos, tmp_path / "b.pt", progress=stop_after_three)
    assert load_checkpoint(tmp_path / "b.pt").train_state["step"] == 3  # no step lost
    resumed = load_checkpoint(train(preset("tiny"), CFG, tiny_videos, tmp_path / "b.pt")).model
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_finished_run_is_not_overwritten(tiny_videos, tmp_path):
    out = train(preset("tiny"), CFG, tiny_videos, tmp_path / "m.pt")
    with pytest.raises(GemxError, match="already holds a finished run"):
        train(preset("tiny"), TrainConfig(steps=8, batch_size=2, crop=32, threads=1), tiny_videos, out)


def test_warm_start_of_robust_variant_computes_the_same_function():
    paper = build_model(preset("tiny")).eval()
    robust = build_model(preset("tiny", robust=True)).eval()
    warm_start(robust, paper)
    target, refs = torch.rand(1, 3, 16, 16), torch.rand(1, 2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(robust(target, refs), paper(target, refs))


def test_pairs_use_distant_references_and_mismatch_uses_other_videos(tiny_videos):
    clips = [cached_frames(v, 64) for v in tiny_videos]
    pairs = ReferencePairs(clips, crop=32, grid=32, mismatch=1.0, seed=3)
    batch = pairs.batch(0, 4)
    assert batch.target_hr.shape == (4, 3, 32, 32) and batch.refs_hr.shape == (4, 1, 3, 32, 32)
    again = pairs.batch(0, 4)
    torch.testing.assert_close(batch.target_hr, again.target_hr)  # a batch is a function of (seed, step)


def test_eval_reports_every_row(tiny_videos, tmp_path):
    attention = build_model(preset("tiny")).eval()
    sisr = build_model(preset("tiny", arch="sisr")).eval()
    rows = evaluate({"att": attention, "sisr": sisr}, tiny_videos[:2], 64, 4, stride=8)
    names = [r.name for r in rows]
    assert names == ["bicubic", "att 1 ref", "att 2 refs", "att 5 refs", "att 5 refs, other person", "sisr"]
    bicubic = rows[0]
    assert 10 < bicubic.psnr["mean"] < 60 and bicubic.psnr["p1"] <= bicubic.psnr["p5"] <= bicubic.psnr["mean"] + 1e-9


def test_lpips_from_a_weights_file(tmp_path):
    from gemx.lpips import LPIPS

    torch.manual_seed(0)
    state, cin, idx = {}, 3, 0  # a random weights file in the VGG-16 + LPIPS heads layout
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            idx += 1
            continue
        state[f"features.{idx}.weight"] = torch.randn(v, cin, 3, 3) * 0.05
        state[f"features.{idx}.bias"] = torch.zeros(v)
        cin, idx = v, idx + 2
    for i, c in enumerate((64, 128, 256, 512, 512)):
        state[f"lin{i}.model.1.weight"] = torch.rand(1, c, 1, 1)
    torch.save(state, tmp_path / "lpips.pt")
    lpips = LPIPS(tmp_path / "lpips.pt")
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    assert (lpips(x, y) > 0).all() and torch.allclose(lpips(x, y), lpips(y, x))
    torch.save({"lin0.model.1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(GemxError, match="not an LPIPS-VGG weights file"):
        LPIPS(tmp_path / "bad.pt")


def test_vgg_feature_loss_from_a_weights_file(tmp_path):
    from gemx.train.losses import SuperResolutionLoss
    from gemx.vgg import VGG19_TO_RELU4_1, vgg_features

    torch.save({f"features.{k}": v for k, v in vgg_features(VGG19_TO_RELU4_1).state_dict().items()}, tmp_path / "vgg.pt")
    loss = SuperResolutionLoss(tmp_path / "vgg.pt")
    assert "VGG-19" in loss.description
    x = torch.rand(1, 3, 32, 32)
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-7) and float(loss(x, torch.rand(1, 3, 32, 32))) > 0
    assert "SSIM" in SuperResolutionLoss().description


def test_eval_at_each_videos_own_geometry_pads_like_a_session(tmp_path):
    """`gemx eval --crop native`: a 90x70 video runs at 88x68 (cut to the scale), padded to the grid as a session
    pads it: its 1-reference row is what a TorchSession gives frame by frame; another person's references of
    another size are resized to it."""
    import numpy as np

    from gemx.frames import to_tensor
    from gemx.metrics import psnr
    from gemx.model.lr import downsample
    from gemx.runtimes.torch_session import TorchSession
    from gemx.train.evaluate import FIRST_TEST_FRAME

    write_video(tmp_path / "wide.mp4", iter([f[:70, :90].copy() for f in clip(70, 96, seed=5)]), Fraction(25))
    write_video(tmp_path / "square.mp4", iter(clip(70, 64, seed=6)), Fraction(25))
    model = build_model(preset("tiny")).eval()
    rows = {r.name: r for r in evaluate({"att": model}, [tmp_path / "wide.mp4", tmp_path / "square.mp4"], 64, 4, stride=8,
                                        crop="native")}
    assert all(np.isfinite(r.video_mean_psnr) for r in rows.values())
    frames = cached_frames(tmp_path / "wide.mp4", None, multiple=4)
    assert frames.shape[1:3] == (68, 88)
    targets = to_tensor(frames[FIRST_TEST_FRAME::8])
    session = TorchSession(model)
    session.set_references(to_tensor(frames[:1]).numpy())
    got = torch.cat([torch.from_numpy(session(x[None].numpy())) for x in downsample(targets, 4)])
    assert rows["att 1 ref"].per_video["wide"] == pytest.approx(float(psnr(got.clamp(0, 1), targets).mean()), abs=1e-4)
    square = {r.name: r for r in evaluate({"att": model}, [tmp_path / "wide.mp4", tmp_path / "square.mp4"], 64, 4, stride=8)}
    assert square["att 1 ref"].per_video["square"] == pytest.approx(rows["att 1 ref"].per_video["square"], abs=1e-4)
    assert square["bicubic"].per_video["wide"] != pytest.approx(rows["bicubic"].per_video["wide"], abs=0.01)
    with pytest.raises(GemxError, match="--crop takes square or native"):
        evaluate({"att": model}, [tmp_path / "wide.mp4"], 64, 4, crop="round")
