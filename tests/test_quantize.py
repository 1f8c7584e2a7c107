"""The VQ bottleneck on its own: straight-through gradient, loss formulas, EMA by hand, restarts, usage, 2 processes."""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import kl_autoencoder.quantize as quantize_module
from kl_autoencoder import QuantizerConfig, VectorQuantizer


def quantizer(weight: torch.Tensor, **config) -> VectorQuantizer:
    """A training-mode quantizer with codebook `weight` (K, D); loading it also restarts the EMA state from it."""
    q = VectorQuantizer(*weight.shape, config=QuantizerConfig(**config))
    q.load_state_dict({"embedding.weight": weight})
    return q.train()


def as_latents(vectors: torch.Tensor) -> torch.Tensor:
    """(N, D) vectors -> (1, D, 1, N) latents, so that row n of the quantizer's lookup is vectors[n]."""
    return vectors.T.reshape(1, vectors.shape[1], 1, -1).clone()


def test_straight_through_gradient_is_the_identity():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 3)
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    codebook = q.embedding.weight.detach().clone()  # the training forward moves the codes afterwards (EMA)
    out = q(z)
    codes = codebook[out.indices].permute(0, 3, 1, 2)  # (B, D, h, w)
    torch.testing.assert_close(out.z_q, codes, rtol=0, atol=1e-6)
    upstream = torch.randn_like(z)
    out.z_q.backward(upstream)
    torch.testing.assert_close(z.grad, upstream, rtol=0, atol=0)


@pytest.mark.parametrize("legacy", [False, True])
def test_losses_equal_their_formulas(legacy):
    torch.manual_seed(0)
    codebook = torch.randn(8, 3)
    q = quantizer(codebook, codebook="loss", legacy_loss=legacy, beta=0.25, dead_after=0)
    vectors = torch.randn(10, 3)
    z = as_latents(vectors).requires_grad_()
    out = q(z)

    # reference: VQ-VAE's ||sg[z] - e||^2 and ||z - sg[e]||^2, with diffusers' index choice (cdist argmin)
    weight, zr = codebook.clone().requires_grad_(), vectors.clone().requires_grad_()
    e = weight[torch.cdist(vectors, codebook).argmin(1)]
    codebook_term = ((zr.detach() - e) ** 2).mean()
    commitment = ((zr - e.detach()) ** 2).mean()
    reference = 0.25 * codebook_term + commitment if legacy else codebook_term + 0.25 * commitment
    reference.backward()

    assert torch.equal(out.indices.flatten(), torch.cdist(vectors, codebook).argmin(1))
    torch.testing.assert_close(out.logs["train/codebook"], codebook_term.detach())
    torch.testing.assert_close(out.logs["train/commitment"], commitment.detach())
    torch.testing.assert_close(out.loss, reference.detach())
    torch.testing.assert_close(out.logs["train/vq_loss"], reference.detach())
    out.loss.backward()
    torch.testing.assert_close(q.embedding.weight.grad, weight.grad)  # 1 vs beta on the codebook term
    torch.testing.assert_close(z.grad[0, :, 0].T, zr.grad)


def test_ema_mode_drops_the_codebook_term():
    torch.manual_seed(0)
    q = quantizer(torch.randn(8, 3), beta=0.25, dead_after=0)
    out = q(torch.randn(1, 3, 2, 5))
    torch.testing.assert_close(out.loss, 0.25 * out.logs["train/commitment"])
    assert not q.embedding.weight.requires_grad


def test_ema_update_by_hand():
    codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    q = quantizer(codebook, decay=0.9, dead_after=0)
    q(as_latents(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [9.0, 1.0]])))  # codes 0, 0, 1; code 2 unused
    # counts (2, 1, 0); sums ((0, 0), (9, 1), (0, 0)); the EMA state starts as one observation of each code
    cluster_size = torch.tensor([0.9 + 0.1 * 2, 0.9 + 0.1 * 1, 0.9])
    embed_sum = torch.tensor([[0.0, 0.0], [0.9 * 10 + 0.1 * 9, 0.1 * 1], [0.0, 0.9 * 10]])
    torch.testing.assert_close(q.cluster_size, cluster_size)
    torch.testing.assert_close(q.embed_sum, embed_sum)
    n, eps = cluster_size.sum(), 1e-5  # Laplace smoothing: (N_i + eps) / (n + K eps) * n
    expected = embed_sum / ((cluster_size + eps) / (n + 3 * eps) * n)[:, None]
    torch.testing.assert_close(q.embedding.weight.detach(), expected, rtol=0, atol=1e-6)
    # by hand, up to eps: code 1 moves towards (9, 1), the unused code 2 keeps its place
    by_hand = torch.tensor([[0, 0], [9.9, 0.1], [0, 10.0]])
    torch.testing.assert_close(q.embedding.weight.detach(), by_hand, atol=1e-3, rtol=0)


def test_revived_codes_are_not_pulled_back_by_stale_ema_state():
    far = torch.full((3, 2), 100.0) + torch.arange(3.0)[:, None]
    q = quantizer(torch.cat([torch.zeros(1, 2), far]), dead_after=2, buffer_size=64)
    g = torch.Generator().manual_seed(0)
    q(torch.randn(1, 2, 4, 4, generator=g))
    assert q.restarts == 0
    q(torch.randn(1, 2, 4, 4, generator=g))  # codes 1..3 unused for 2 forwards: restarted onto the data
    assert q.restarts == 3
    revived = q.embedding.weight.detach()[1:]
    assert revived.norm(dim=1).max() < 5
    assert torch.equal(q.cluster_size[1:], torch.ones(3)) and torch.equal(q.embed_sum[1:], revived)
    for _ in range(3):  # with stale sums (~100) and sizes (~0.98), the next EMA step would put them back at ~100
        q(torch.randn(1, 2, 4, 4, generator=g))
    assert q.embedding.weight.detach().norm(dim=1).max() < 5


def run_toy(dead_after: int, codebook: str = "ema", steps: int = 40) -> VectorQuantizer:
    """64 codes far from 2-D data: without help only the nearest one is ever used."""
    torch.manual_seed(0)
    q = quantizer(torch.randn(64, 2) * 0.01 + 20.0, codebook=codebook, dead_after=dead_after, window=10)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        q(torch.rand(4, 2, 8, 8, generator=g) * 2 - 1)  # 256 vectors uniform in [-1, 1]^2
    return q


@pytest.mark.parametrize("codebook", ["ema", "loss"])
def test_restarts_revive_dead_codes(codebook):
    q = run_toy(dead_after=5, codebook=codebook)
    assert q.usage > 0.9 and q.perplexity > 40
    assert q.restarts >= 63 and q.dead_codes == 0


def test_without_restarts_the_codebook_collapses():
    q = run_toy(dead_after=0)
    assert q.usage <= 2 / 64 and q.perplexity < 2 and q.restarts == 0
    assert q.dead_codes >= 62  # unused over the window


def test_perplexity_does_not_depend_on_batch_size():
    torch.manual_seed(0)
    codebook = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).reshape(64, 2)
    perplexities = []
    for batch in (16, 256):  # vectors per forward
        q = quantizer(codebook, codebook="loss", dead_after=0, window=200)  # a fixed codebook, used uniformly
        g = torch.Generator().manual_seed(batch)
        for _ in range(200):
            z = codebook[torch.randint(64, (batch,), generator=g)] + 0.1 * torch.randn(batch, 2, generator=g)
            logs = q(as_latents(z)).logs
        perplexities.append(logs["vq/perplexity"])
        assert logs["vq/usage"] == 1.0
    # a one-batch perplexity (taming's) cannot exceed 16 with 16 vectors; the window's is ~64 for both sizes
    assert all(abs(p - 64) < 3 for p in perplexities), perplexities


def test_normalized_codes_are_stored_unit_and_looked_up_by_cosine():
    torch.manual_seed(0)
    q = VectorQuantizer(32, 3, normalize_codes=True, config=QuantizerConfig(dead_after=2, window=4)).train()
    z = torch.randn(2, 3, 4, 4) * 5
    out = q(z)
    for _ in range(4):  # EMA steps and restarts keep the stored codebook on the unit sphere
        q(torch.randn(2, 3, 4, 4) * 5)
    assert q.restarts > 0
    torch.testing.assert_close(q.embedding.weight.norm(dim=1), torch.ones(32))
    q.eval()
    out = q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    cosine = F.normalize(flat, dim=1) @ q.embedding.weight.T
    assert torch.equal(out.indices.flatten(), cosine.argmax(1))
    assert torch.equal(out.indices.flatten(), torch.cdist(flat, q.embedding.weight).argmin(1))  # diffusers' pick
    torch.testing.assert_close(out.z_q.norm(dim=1), torch.ones(2, 4, 4))


def test_lookup_is_fp32_under_autocast():
    torch.manual_seed(0)
    q = VectorQuantizer(512, 4).eval()
    z = torch.randn(2, 4, 8, 8)
    reference = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.bfloat16())
    assert out.z_q.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert torch.equal(out.indices, q(z.bfloat16().float()).indices)
    assert (out.indices == reference.indices).float().mean() > 0.9  # only bf16 rounding of z itself differs


def test_eval_mode_changes_nothing():
    q = VectorQuantizer(16, 2, config=QuantizerConfig(dead_after=1)).eval()
    before = {k: v.clone() for k, v in q.statistics().items()}
    weight = q.embedding.weight.detach().clone()
    q(torch.randn(2, 2, 4, 4) + 10)
    assert all(torch.equal(q.statistics()[k], v) for k, v in before.items())
    assert torch.equal(q.embedding.weight, weight)


def test_config_and_statistics_are_checked():
    with pytest.raises(ValueError, match="codebook"):
        QuantizerConfig(codebook="kmeans")
    with pytest.raises(ValueError, match="decay"):
        QuantizerConfig(decay=1.0)
    q = VectorQuantizer(16, 2, config=QuantizerConfig(window=10))
    with pytest.raises(ValueError, match="window_counts"):
        q.load_statistics(VectorQuantizer(16, 2, config=QuantizerConfig(window=20)).statistics())
    with pytest.raises(ValueError, match="lack"):
        q.load_statistics({})


def _two_process_worker(rank: int, folder: str) -> None:
    """Train a quantizer for a few steps on this rank's own data; save the result for the parent to compare."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        # restarts must stay on only while the statistics are shared: the dead set decides the broadcast's shape
        for name, dead_after in (("synced", 3), ("unsynced", 0)):
            if name == "unsynced":  # what a reference without the all-reduce does
                quantize_module._all_reduce = lambda t: t
            torch.manual_seed(0)  # the same initial codebook on both processes, as DDP broadcasts it
            q = VectorQuantizer(64, 2, config=QuantizerConfig(dead_after=dead_after, window=5, buffer_size=64))
            q.train()
            g = torch.Generator().manual_seed(100 + rank)
            for _ in range(12):
                q(torch.randn(2, 2, 4, 4, generator=g) + 3.0 * rank)  # different data on each process
            torch.save({"weight": q.embedding.weight.detach(), **q.statistics()}, f"{folder}/{name}_{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_codebooks_stay_identical_across_processes(tmp_path):
    mp.spawn(_two_process_worker, args=(str(tmp_path),), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"synced_{rank}.pt") for rank in (0, 1))
    assert a["restarts"] > 0 and a["restarts"] == b["restarts"]
    for key in ("weight", "cluster_size", "embed_sum", "window_counts", "unused_for", "steps"):
        assert torch.equal(a[key], b[key]), key  # bitwise
    assert not torch.equal(a["recent"], b["recent"])  # each keeps its own candidates; rank 0's are used
    # without the all-reduce the same run drifts apart: the data differ enough for the test to mean something
    a, b = (torch.load(tmp_path / f"unsynced_{rank}.pt") for rank in (0, 1))
    assert not torch.equal(a["weight"], b["weight"])
