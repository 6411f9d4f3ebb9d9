import copy

import pytest
import torch
import torch.nn.functional as F

from gemx import GemxError
from gemx.model import build_model, preset, synthesize_lr, upsample_bicubic
from gemx.model.lr import downsample
from gemx.model.network import block_attention, key_blocks, subpixel_head, upsample2x, value_blocks
from tests.conftest import frames


def naive_block_attention(q, k, v, b):
    """Loop over blocks: each query block attends to the same block of every reference."""
    n, c, h, w = q.shape
    r = k.shape[1]
    out = torch.zeros_like(q)
    for y in range(0, h, b):
        for x in range(0, w, b):
            qb = q[0, :, y:y + b, x:x + b].reshape(c, -1).T  # [BB, C]
            kb = k[0, :, :, y:y + b, x:x + b].permute(1, 0, 2, 3).reshape(c, r * b * b)  # [C, R*BB]
            vb = v[0, :, :, y:y + b, x:x + b].permute(0, 2, 3, 1).reshape(r * b * b, c)
            out[0, :, y:y + b, x:x + b] = (torch.softmax(qb @ kb, -1) @ vb).T.reshape(c, b, b)
    return out


@pytest.mark.parametrize("refs", [1, 3])
def test_block_attention_equals_naive_loop(refs):
    b, c = 4, 5
    q = torch.randn(1, c, 8, 12)
    k, v = torch.randn(1, refs, c, 8, 12), torch.randn(1, refs, c, 8, 12)
    got = block_attention(q, key_blocks(k, b), value_blocks(v, b), b)
    torch.testing.assert_close(got, naive_block_attention(q, k, v, b), atol=1e-5, rtol=1e-5)


def test_subpixel_head_is_the_head_over_edge_padded_upsampled_features(tiny_model):
    """The head on 2x2 phases equals the head everywhere once its first convolution reads the upsampled features
    edge-padded instead of zero-padded, and equals the head itself inside the frame's outer 2 pixels."""
    head = copy.deepcopy(tiny_model.decoder.head)
    torch.manual_seed(0)
    for p in head.parameters():  # the residual model's last convolution starts at zero
        torch.nn.init.normal_(p, std=0.3)
    x = torch.relu(torch.randn(2, head[0].in_channels, 6, 10))
    with torch.no_grad():
        got, up = subpixel_head(head, x), upsample2x(x)
        exact = head(up)
        edge = head[2](head[1](F.conv2d(F.pad(up, (1, 1, 1, 1), mode="replicate"), head[0].weight, head[0].bias)))
    assert got.shape == exact.shape == (2, 3, 12, 20)
    torch.testing.assert_close(got, edge, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[..., 2:-2, 2:-2], exact[..., 2:-2, 2:-2], atol=1e-5, rtol=1e-5)
    assert (got - exact).abs().amax() > 1e-2  # the border is where they differ


def test_output_invariant_to_reference_order_and_duplication(tiny_model):
    cfg = tiny_model.config
    target = downsample(frames(1, cfg.size, seed=1), cfg.scale)
    refs = frames(3, cfg.size, seed=2)[None]
    with torch.no_grad():
        base = tiny_model(target, refs)
        permuted = tiny_model(target, refs[:, [2, 0, 1]])
        duplicated = tiny_model(target, torch.cat([refs, refs], dim=1))
    torch.testing.assert_close(permuted, base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(duplicated, base, atol=1e-5, rtol=1e-5)


def test_more_references_change_the_output(tiny_model):
    """Guards the invariance test against a model that ignores its references."""
    cfg = tiny_model.config
    target = downsample(frames(1, cfg.size, seed=1), cfg.scale)
    with torch.no_grad():
        one = tiny_model(target, frames(1, cfg.size, seed=2)[None])
        two = tiny_model(target, torch.cat([frames(1, cfg.size, seed=2), frames(1, cfg.size, seed=3)])[None])
    assert (one - two).abs().max() > 1e-4


@pytest.mark.parametrize("scale", [4, 8])
@pytest.mark.parametrize("arch", ["attention", "sisr", "coarse"])
def test_shapes_at_both_scales(scale, arch):
    model = build_model(preset("tiny", scale=scale, arch=arch)).eval()
    s = model.config.size
    with torch.no_grad():
        out = model(torch.rand(2, 3, s // scale, s // scale), torch.rand(2, 3, 3, s, s))
    assert out.shape == (2, 3, s, s)


def test_split_forward_equals_full_forward(tiny_model):
    cfg = tiny_model.config
    target, refs = downsample(frames(1, cfg.size, 1), cfg.scale), frames(2, cfg.size, 2)
    with torch.no_grad():
        full = tiny_model(target, refs[None])
        split = tiny_model.attend_and_decode(target, tiny_model.encode_references(refs))
    torch.testing.assert_close(split, full)


def test_paper_preset_parameter_count_within_10_percent_of_paper():
    params = sum(p.numel() for p in build_model(preset("paper")).parameters())
    assert abs(params - 20.22e6) / 20.22e6 < 0.10, params


def test_paper_preset_level_sizes():
    cfg = preset("paper")
    assert cfg.level_sizes == (192, 96, 48) and cfg.channels[-1] == 512


def test_zero_or_missing_references_is_a_clear_error(tiny_model):
    with pytest.raises(GemxError, match="no references"):
        tiny_model.encode_references(torch.rand(1, 0, 3, 64, 64))
    with pytest.raises(GemxError, match=r"references must be RGB frames .* got nothing"):
        tiny_model(torch.rand(1, 3, 16, 16))


def test_wrong_shape_is_a_clear_error(tiny_model):
    with pytest.raises(GemxError, match=r"target_lr must be RGB frames"):
        tiny_model.attend_and_decode(torch.rand(1, 1, 16, 16), tiny_model.encode_references(torch.rand(1, 3, 64, 64)))


def test_block_size_that_does_not_divide_feature_maps_fails_at_construction():
    with pytest.raises(GemxError, match="block size 5 does not divide"):
        preset("tiny", block_size=5)


@pytest.mark.parametrize("scale", [4, 8])
def test_bicubic_convolution_equals_torch_bicubic(scale):
    x = torch.rand(2, 3, 12, 10, dtype=torch.float64)
    want = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
    torch.testing.assert_close(upsample_bicubic(x, scale), want, atol=1e-12, rtol=0)


def test_lr_synthesis_is_pool_then_bicubic():
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    want = F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="bicubic", align_corners=False)
    torch.testing.assert_close(synthesize_lr(x, 4), want)


def test_residual_model_starts_as_bicubic_and_robust_one_sees_the_target():
    lr = torch.rand(1, 3, 16, 16)
    model = build_model(preset("tiny", robust=True, residual=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(lr, torch.rand(1, 2, 3, 64, 64)), upsample_bicubic(lr, 4))
    first_skip = model.decoder.level1[0]
    assert first_skip.in_channels == 8 + 2 * 8  # upsampled features + attended + the target's own level-1 features
