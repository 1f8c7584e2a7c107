"""The VQ variant through the same trainer: VQ logs, a VQModel export, exact resume, identical codebooks."""

import json
from pathlib import Path

import pytest
import torch

from kl_ae.commands.cli import main as kl_ae
from kl_ae.common.config import ConfigError
from kl_autoencoder import Autoencoder
from training.config import load_config

from .conftest import launch_two_processes

ROOT = Path(__file__).resolve().parents[1]
TINY_VQ = [
    "--config", "tiny-vq", "model.base_channels=16", "model.num_codes=32", "data.resolution=32", "data.resize=48",
    "data.batch_size=2", "data.repeats=2", "train.log_every=1", "train.eval_every=2", "train.sample_every=100",
    "train.checkpoint_every=2", "train.tracker=none", "train.mixed_precision=no", "loss.disc_start=2",
    "loss.disc_channels=8", "loss.lpips=off", "vq.dead_after=2",
]  # fmt: skip


@pytest.mark.slow
def test_tiny_vq_trains_and_exports_a_vqmodel(tmp_path):
    from diffusers import VQModel

    out = tmp_path / "vq"
    assert kl_ae(["train", "--out", str(out), "--max-steps", "4", *TINY_VQ]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("train/vq_loss", "train/commitment", "vq/usage", "vq/perplexity", "vq/dead_codes", "vq/restarts"):
        assert key in rows[-1], key
    assert "train/kl" not in rows[-1]
    config = json.loads((out / "diffusers" / "config.json").read_text())
    assert config["_class_name"] == "VQModel" and config["num_vq_embeddings"] == 32
    theirs = VQModel.from_pretrained(out / "diffusers").eval()
    ours = Autoencoder.from_pretrained(out).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert (ours(x) - theirs(x).sample).abs().max() <= 1e-5


@pytest.mark.slow
def test_vq_resume_is_exact(tmp_path):
    from .conftest import checkpoint_tensors

    args = [*TINY_VQ, "train.checkpoint_every=2"]
    kl_ae(["train", "--out", str(tmp_path / "a"), "--max-steps", "4", *args])
    kl_ae(["train", "--out", str(tmp_path / "b"), "--max-steps", "2", *args])
    kl_ae(["train", "--out", str(tmp_path / "b"), "--max-steps", "4", *args])
    a = checkpoint_tensors(tmp_path / "a" / "checkpoints" / "step_0000004")
    b = checkpoint_tensors(tmp_path / "b" / "checkpoints" / "step_0000004")
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
    qa = torch.load(tmp_path / "a" / "checkpoints" / "step_0000004" / "quantizer.pt", weights_only=True)
    qb = torch.load(tmp_path / "b" / "checkpoints" / "step_0000004" / "quantizer.pt", weights_only=True)
    assert qa.keys() == qb.keys() and all(torch.equal(qa[k], qb[k]) for k in qa)


@pytest.mark.slow
def test_two_processes_keep_one_codebook(tmp_path):
    out = tmp_path / "ddp"
    launch_two_processes(["--out", str(out), "--max-steps", "4", *TINY_VQ])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["replicas_identical"] is True  # codebook included


@pytest.mark.slow
def test_decoder_only_training_keeps_the_codebook_bit_identical(tmp_path):
    """train.trainable=decoder on a VQ model: no gradient, EMA step or restart moves a code (restarts after one
    unused forward would, vq.dead_after=1), and the encoder stays as it was, while the decoder trains."""
    from diffusers import VQModel
    from safetensors.torch import load_file

    base, tuned = tmp_path / "base", tmp_path / "ft"
    assert kl_ae(["train", "--out", str(base), "--max-steps", "2", *TINY_VQ]) == 0
    start = Autoencoder.from_pretrained(base)
    args = [*TINY_VQ, f"model.init_from={base}", "train.trainable=decoder", "vq.dead_after=1", "loss.disc_start=0"]
    assert kl_ae(["train", "--out", str(tuned), "--max-steps", "3", *args]) == 0
    codebook = start.quantize.embedding.weight
    live = load_file(tuned / "checkpoints" / "step_0000003" / "model.safetensors")
    assert torch.equal(live["autoencoder.quantize.embedding.weight"], codebook)
    exported = Autoencoder.from_pretrained(tuned)  # the EMA weights
    assert torch.equal(exported.quantize.embedding.weight, codebook)
    assert torch.equal(VQModel.from_pretrained(tuned / "diffusers").quantize.embedding.weight, codebook)
    for name in ("encoder", "quant_conv"):
        a, b = getattr(start, name).state_dict(), getattr(exported, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert any(not torch.equal(a, b) for a, b in zip(start.decoder.parameters(), exported.decoder.parameters()))
    rows = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert all(r["vq/dead_codes"] > 0 for r in rows)  # codes a live quantizer would have restarted
    assert all(r["vq/usage"] > 0 for r in rows) and rows[-1]["vq/restarts"] == 0  # usage is still counted


def test_decoder_only_training_keeps_a_loss_trained_codebook_frozen(tmp_path):
    """With `vq.codebook=loss` the codebook is learned by gradient, so `train.trainable=decoder` must freeze it with
    the encoder: the trainer's own setup leaves it out of the optimizer, and real steps (GAN on) leave it
    bit-identical while the decoder trains."""
    from accelerate import Accelerator

    from kl_autoencoder import QuantizerConfig
    from training.step import StepSchedule
    from training.train import build_data, build_models, prepare_step

    from .conftest import tiny

    torch.manual_seed(0)
    Autoencoder(tiny("tiny-vq", num_codes=32), vq=QuantizerConfig(codebook="loss")).save_pretrained(tmp_path / "base")
    overrides = [*TINY_VQ[2:], "vq.codebook=loss", f"model.init_from={tmp_path / 'base'}", "train.trainable=decoder",
                 "loss.disc_start=0", f"out_dir={tmp_path / 'ft'}"]  # fmt: skip
    cfg = load_config("tiny-vq", overrides)
    accelerator = Accelerator(cpu=True)
    models = build_models(cfg, accelerator, "no", print)
    step, _, _ = prepare_step(cfg, accelerator, models, build_data(cfg, accelerator, print), fp16=False)
    ae = models.model.autoencoder
    codebook, start = ae.quantize.embedding.weight, ae.quantize.embedding.weight.detach().clone()
    decoder = [p.detach().clone() for p in ae.decoder.parameters()]
    optimized = {id(p) for group in step.modules.opt_g.optimizer.param_groups for p in group["params"]}
    assert id(codebook) not in optimized and id(ae.decoder.conv_out.weight) in optimized
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for _ in range(2):
        step(x, None, StepSchedule(disc_factor=1.0))
    assert torch.equal(codebook, start)
    assert any(not torch.equal(a, b) for a, b in zip(decoder, ae.decoder.parameters()))


def test_vq_options_on_a_kl_model_are_an_error():
    with pytest.raises(ConfigError, match=r"^model\.num_codes: a VQ option, but model.preset tiny is a KL model"):
        load_config(None, ["model.num_codes=64"])
    with pytest.raises(ConfigError, match=r"^vq\.dead_after: a VQ option"):
        load_config(None, ["vq.dead_after=5"])
    with pytest.raises(ConfigError, match=r"^vq: codebook must be"):
        load_config("tiny-vq", ["vq.codebook=kmeans"])
