"""The trainer's EMA (`GuardedEMA`): diffusers' `EMAModel` arithmetic, plus a device-side skip."""

import pytest
import torch
from diffusers.training_utils import EMAModel

from training.step import GuardedEMA


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(4, 3), (5,), (2, 2, 3), ()]]
    params[1].requires_grad_(False)  # a frozen tensor: both copy it instead of averaging it
    return params


def _train(params: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("warmup", [True, False])
def test_guarded_ema_matches_diffusers_ema(warmup):
    params = _params(0)
    kwargs = dict(decay=0.6, use_ema_warmup=warmup, inv_gamma=1.0, power=2 / 3)
    ours, theirs = GuardedEMA(params, **kwargs), EMAModel(params, **kwargs)
    gen = torch.Generator().manual_seed(1)
    decays = []
    for _ in range(15):
        _train(params, gen)
        ours.step(params, keep=torch.ones((), dtype=torch.bool))
        theirs.step(params)
        decays.append(ours.cur_decay_value)
        assert ours.cur_decay_value == theirs.cur_decay_value
        for a, b in zip(ours.shadow_params, theirs.shadow_params, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # the steps cover every regime: 0 (a copy), rising (warm-up or (1 + n) / (10 + n)), capped at `decay`
    assert decays[0] == 0 and 0 < decays[1] < decays[-2] and decays[-1] == 0.6
    assert not torch.equal(ours.shadow_params[0], params[0])  # an average, not a copy
    assert torch.equal(ours.shadow_params[1], params[1])  # the frozen tensor is copied


def test_keep_false_leaves_the_average_unchanged():
    params = _params(0)
    ours, theirs = GuardedEMA(params, decay=0.9), EMAModel(params, decay=0.9)
    gen = torch.Generator().manual_seed(1)
    for keep in (True, True, False, True):
        _train(params, gen)
        before = [s.clone() for s in ours.shadow_params]
        ours.step(params, keep=torch.tensor(keep))
        if keep:
            theirs.step(params)
            for a, b in zip(ours.shadow_params, theirs.shadow_params, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:  # nothing averaged moves; the skipped step still counts, as diffusers counts every `step` call
            trained = [i for i, p in enumerate(params) if p.requires_grad]
            assert all(torch.equal(before[i], ours.shadow_params[i]) for i in trained)
            assert not torch.equal(before[0], params[0])  # there was something to average towards
            theirs.optimization_step += 1
    assert ours.optimization_step == theirs.optimization_step == 4
