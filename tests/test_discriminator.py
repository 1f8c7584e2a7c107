"""PatchGAN discriminator: shapes, taming's init, per-sample independence of the group-norm variant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.discriminator import PatchDiscriminator


@pytest.mark.parametrize("size,patches", [(64, 6), (256, 30)])
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_output_shape(size, patches, norm):
    d = PatchDiscriminator(norm=norm)
    out = d(torch.randn(2, 3, size, size))
    # three stride-2 convs then two stride-1 k4 p1 convs (each -1): 256 -> 32 -> 31 -> 30
    assert out.shape == (2, 1, patches, patches)


def test_layout_matches_taming():
    d = PatchDiscriminator()
    convs = [m for m in d.main if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    # state-dict keys as in taming's NLayerDiscriminator (main.{i}.*)
    assert "main.0.weight" in d.state_dict() and "main.11.weight" in d.state_dict()
    assert isinstance(d.main[3], nn.BatchNorm2d)


def test_init_statistics():
    torch.manual_seed(0)
    d = PatchDiscriminator(norm="group")
    w = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, nn.Conv2d)])
    assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.02) < 1e-3
    norms = [m for m in d.modules() if isinstance(m, nn.GroupNorm)]
    g = torch.cat([m.weight for m in norms])
    assert abs(g.mean() - 1) < 5e-3 and abs(g.std() - 0.02) < 5e-3
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)


def test_group_norm_is_per_sample_batch_norm_is_not():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    group, batch = PatchDiscriminator(norm="group").train(), PatchDiscriminator(norm="batch").train()
    whole = group(x)
    halves = torch.cat([group(x[:2]), group(x[2:])])
    torch.testing.assert_close(whole, halves, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch(x), torch.cat([batch(x[:2]), batch(x[2:])]), atol=1e-4)


def test_small_widths_and_errors():
    d = PatchDiscriminator(base_channels=8, n_layers=2, norm="group")  # 16 and 32 channels: 16 and 32 groups
    assert d(torch.randn(1, 3, 32, 32)).shape[1] == 1
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="instance")


def test_gradients_reach_input():
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    PatchDiscriminator(norm="group")(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
