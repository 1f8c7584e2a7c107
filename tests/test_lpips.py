"""LPIPS wrapper: offline build, frozen + eval + fp32, gradients to the input, weight resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from kl_ae.common.lpips import LPIPS, autocast_dtype, build_lpips, find_backbone, missing_weights_message


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """An empty torch hub under tmp_path, found through $TORCH_HOME like a user's would be."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # undo any torch.hub.set_dir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def random_vgg() -> LPIPS:
    return LPIPS("vgg", random_backbone=True)


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_random_backbone_is_frozen_and_marked(random_vgg):
    assert random_vgg.random and random_vgg.net_name == "vgg"
    params = list(random_vgg.parameters())
    assert params and not any(p.requires_grad for p in params)
    # the heads are frozen too, not only the backbone
    assert not random_vgg.model.lin0.model[1].weight.requires_grad


def test_stays_in_eval_mode(random_vgg):
    parent = nn.ModuleDict({"lpips": random_vgg, "other": nn.Dropout()})
    parent.train()
    assert parent["other"].training
    assert not any(m.training for m in random_vgg.modules())
    x, y = images(), images(seed=1)
    # dropout off: repeated calls agree exactly
    assert torch.equal(random_vgg(x, y), random_vgg(x, y))


def test_fp32_under_autocast(random_vgg):
    x, y = images(), images(seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = random_vgg(x.bfloat16(), y.bfloat16())
    assert d.dtype == torch.float32 and d.shape == (2,)
    torch.testing.assert_close(d, random_vgg(x.bfloat16().float(), y.bfloat16().float()))


def test_dtype_option_runs_in_that_precision(random_vgg):
    fast = LPIPS("vgg", random_backbone=True, dtype=torch.bfloat16)
    fast.load_state_dict(random_vgg.state_dict())
    seen = []
    fast.model.net.slice1[0].register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    x, y = images(), images(seed=1)
    d, exact = fast(x, y), random_vgg(x, y)  # no autocast around it: LPIPS opens its own
    assert seen == [torch.bfloat16, torch.bfloat16] and d.dtype == torch.float32 and d.shape == (2,)
    assert not torch.equal(d, exact)  # computed in bf16 ...
    assert (d - exact).abs().max() < 0.25 * exact.abs().max()  # ... close to the fp32 distance
    assert autocast_dtype("bf16") is torch.bfloat16 and autocast_dtype("fp16") is torch.float16
    assert autocast_dtype("no") is None


def test_distance_and_gradient(random_vgg):
    x, y = images(), images(seed=1)
    assert random_vgg(x, x).abs().max() < 1e-6
    assert (random_vgg(x, y) > 0).all()
    x_hat = y.clone().requires_grad_(True)
    random_vgg(x, x_hat).sum().backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0


def test_required_without_weights_names_file_and_folder(hub_dir):
    assert find_backbone("vgg", None)[0] is None
    with pytest.raises(FileNotFoundError) as e:
        build_lpips("required", "vgg")
    msg = str(e.value)
    for part in ("vgg16-397923af.pth", str(hub_dir), "https://download.pytorch.org/models/vgg16-397923af.pth",
                 "loss.lpips_weights", "loss.lpips=off"):  # fmt: skip
        assert part in msg
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        LPIPS("alex")
    assert "alexnet-owt-7be5be79.pth" in missing_weights_message("alex", None)


def test_auto_off_and_invalid(hub_dir, tmp_path):
    module, why = build_lpips("auto", "vgg")
    assert module is None and "vgg16-397923af.pth" in why
    assert build_lpips("off") == (None, "disabled by config")
    with pytest.raises(ValueError, match="loss.lpips"):
        build_lpips("sometimes")
    with pytest.raises(ValueError, match="loss.lpips_net"):
        build_lpips("auto", "squeeze")
    # an explicit path that does not exist is an error even under auto (a typo, not a choice)
    with pytest.raises(FileNotFoundError, match="loss.lpips_weights"):
        build_lpips("auto", "vgg", weights_path=str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_backbone_loads_from_hub_cache(hub_dir, net):
    torch.manual_seed(0)
    tv = torchvision.models.vgg16(weights=None) if net == "vgg" else torchvision.models.alexnet(weights=None)
    state = tv.state_dict()
    if net == "vgg":
        # VGG's classifier is 500 MB; the loader ignores it (the full alexnet file covers that)
        state = {k: v for k, v in state.items() if k.startswith("features.")}
    file = "vgg16-397923af.pth" if net == "vgg" else "alexnet-owt-7be5be79.pth"
    hub_dir.mkdir(parents=True)
    torch.save(state, hub_dir / file)

    module, why = build_lpips("required", net)
    assert why == f"{net}: {hub_dir / file}" and not module.random and module.dtype is None
    assert build_lpips("required", net, dtype=torch.bfloat16)[0].dtype is torch.bfloat16
    backbone = module.model.net
    first = backbone.slice1[0].weight
    assert torch.equal(first, state["features.0.weight"])
    last = "28" if net == "vgg" else "10"
    assert torch.equal(backbone.slice5.get_submodule(last).bias, state[f"features.{last}.bias"])
    assert not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("damage", ["drop", "reshape", "extra"])
def test_wrong_backbone_file_is_rejected(tmp_path, damage):
    state = torchvision.models.alexnet(weights=None).state_dict()
    if damage == "drop":
        del state["features.3.weight"]
    elif damage == "reshape":
        state["features.0.weight"] = torch.zeros(64, 3, 3, 3)
    else:  # e.g. a VGG file given for AlexNet: layers the backbone does not have
        state["features.14.weight"] = torch.zeros(8, 8, 3, 3)
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="not a matching torchvision backbone"):
        LPIPS("alex", weights_path=str(path))
