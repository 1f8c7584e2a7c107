"""A few steps through the real entry points: the run folder, the diffusers export, resume, precision, DDP."""

import json
from pathlib import Path

import pytest
import torch

from kl_ae.commands.cli import main as kl_ae
from kl_autoencoder import Autoencoder

from .conftest import TINY_RUN, launch_two_processes

ROOT = Path(__file__).resolve().parents[1]
# a 16-channel f4 model on 32 px crops: a step takes well under a second on 2 cores
TINY = [
    *TINY_RUN,
    "train.log_every=1",
    "train.eval_every=2",
    "train.sample_every=2",
    "train.checkpoint_every=2",
    "loss.disc_start=2",
    "loss.disc_channels=8",
    "loss.lpips=off",
]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_train_cli_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert kl_ae(["train", "--out", str(out), "--max-steps", "4", *TINY]) == 0
    printed = capsys.readouterr()
    assert "validation PSNR" in printed.out and "diffusers folder" in printed.out
    assert "1 process(es)" in printed.out

    for name in ("config.yaml", "metrics.jsonl", "summary.json", "samples", "checkpoints", "diffusers"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["num_processes"] == 1
    assert summary["first_eval"]["step"] == 0 and summary["last_eval"]["step"] == 4
    assert {"wall_s", "img_per_s", "mixed_precision", "lpips"} <= summary.keys()
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    val = read_jsonl(out / "val.jsonl")
    assert [r["step"] for r in val] == [0, 2, 4] and val[-1] == summary["last_eval"]  # train.eval_every=2
    # the adversarial terms appear once the discriminator starts at step 2
    assert "train/g_adv" not in rows[0] and rows[0]["train/disc_factor"] == 0
    for key in (
        "train/l1",
        "train/kl",
        "train/kl_bits_per_dim",
        "train/nll",
        "train/logvar",
        "train/g_adv",
        "train/d_weight",
        "train/disc_factor",
        "train/d_loss",
        "logits/real",
        "logits/fake",
        "lr",
        "img_per_s",
    ):
        assert key in rows[-1], key  # fmt: skip
    assert (out / "checkpoints" / "latest").read_text() == "step_0000004"
    assert sorted(p.name for p in (out / "samples").glob("*.png"))[0] == "step_0000000.png"

    # the export loads in diffusers and reconstructs exactly as our model does
    from diffusers import AutoencoderKL

    ours = Autoencoder.from_pretrained(out).eval()
    theirs = AutoencoderKL.from_pretrained(out / "diffusers").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        diff = (ours(x) - theirs(x, sample_posterior=False).sample).abs().max().item()
    assert diff <= 1e-5

    # re-running the same command with more steps resumes from the latest checkpoint; rows a killed run logged
    # after that checkpoint (here: made up, plus a line cut short) are dropped, not repeated
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "train/loss": 1.0}) + '\n{"step": 6, "train/lo')
    with open(out / "val.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "val/psnr": 1.0}) + "\n")
    assert kl_ae(["train", "--out", str(out), "--max-steps", "6", *TINY]) == 0
    assert "resumed from" in capsys.readouterr().out
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[4]["train/loss"] != 1.0
    assert [r["step"] for r in read_jsonl(out / "val.jsonl")] == [0, 2, 4, 6]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["first_eval"]["step"] == 0

    # kl-ae export writes a diffusers folder from the latest checkpoint
    assert kl_ae(["export", str(out), "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "checkpoints" / "latest").read_text() == "step_0000006"


def test_config_mistake_exits_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    assert kl_ae(["train", "--out", str(out), "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: optim.lrr: unknown key") and "Traceback" not in err
    assert not out.exists()


def _changed_fraction(before: dict, after: dict) -> float:
    changed = sum((before[k] != after[k]).sum().item() for k in before)
    return changed / sum(v.numel() for v in before.values())


@pytest.mark.slow
def test_bf16_autocast_keeps_fp32_master_weights(tmp_path):
    from accelerate.utils import set_seed

    from training.config import load_config

    out = tmp_path / "bf16"
    cfg = load_config(None, [*TINY, f"out_dir={out}", "train.max_steps=3", "train.mixed_precision=bf16"])
    set_seed(cfg.train.seed)
    init = {k: v.clone() for k, v in Autoencoder(cfg.model.autoencoder_config()).state_dict().items()}
    from training.train import main

    summary = main(cfg)
    assert summary["mixed_precision"] == "bf16"
    trained = Autoencoder.from_pretrained(out)
    assert all(v.dtype == torch.float32 for v in trained.state_dict().values())
    # small fp32 updates are kept: nearly every weight moves (the reference's bf16 weights moved 4.5%)
    assert _changed_fraction(init, trained.state_dict()) > 0.9


@pytest.mark.parametrize("autocast", [False, True])
def test_lpips_precision_in_training(tmp_path, monkeypatch, autocast):
    """loss.lpips_autocast=true runs LPIPS's convolutions in bf16 inside the real step; false keeps them fp32."""
    import training.train
    from kl_ae.common.lpips import LPIPS

    seen = set()

    def random_lpips(mode, net, weights_path, dtype, download):  # stands in for weights this machine does not have
        module = LPIPS("alex", random_backbone=True, dtype=dtype)
        module.model.net.slice1[0].register_forward_hook(lambda m, args, out: seen.add(out.dtype))
        return module, f"random alex for the test, {dtype}"

    monkeypatch.setattr(training.train, "build_lpips", random_lpips)
    argv = ["train", "--out", str(tmp_path / "run"), "--max-steps", "2", *TINY, "loss.lpips=required"]
    argv += ["train.export=false"]  # not checked here: a finished run then writes no diffusers folder
    assert kl_ae([*argv, "train.mixed_precision=bf16", f"loss.lpips_autocast={str(autocast).lower()}"]) == 0
    assert seen == ({torch.bfloat16} if autocast else {torch.float32})
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert ("under bf16 autocast" in summary["lpips"]) == autocast
    assert summary["steps"] == 2 and not (tmp_path / "run" / "diffusers").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision needs a CUDA GPU")
def test_fp16_with_loss_scaling_on_gpu(tmp_path):
    assert (
        kl_ae(["train", "--out", str(tmp_path / "fp16"), "--max-steps", "3", *TINY, "train.mixed_precision=fp16"]) == 0
    )


def test_fp16_on_cpu_is_a_config_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kl_ae(["train", "--out", str(tmp_path / "x"), *TINY, "train.mixed_precision=fp16"]) == 2
    assert "train.mixed_precision: fp16 needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_cpu_run_keeps_replicas_identical(tmp_path):
    """Two real processes (accelerate's CPU multi-process launch), discriminator on after 2 steps."""
    out = tmp_path / "ddp"
    proc = launch_two_processes(["--out", str(out), "--max-steps", "4", *TINY, "loss.disc_norm=batch"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["replicas_identical"] is True
    assert "train/d_loss" in read_jsonl(out / "metrics.jsonl")[-1]
    assert "2 process(es)" in proc.stdout


@pytest.mark.slow
def test_gradient_accumulation_covers_both_models(tmp_path):
    """grad_accum=2: one optimizer step per two batches, for the autoencoder and the discriminator alike."""
    from training.config import load_config
    from training.train import main

    out = tmp_path / "accum"
    cfg = load_config(None, [*TINY, f"out_dir={out}", "train.max_steps=3", "train.grad_accum=2", "loss.disc_start=1"])
    summary = main(cfg)
    assert summary["steps"] == 3
    state = json.loads((out / "checkpoints" / "step_0000003" / "trainer_state.json").read_text())
    assert state["batches_seen"] == 6
    d_state = torch.load(out / "checkpoints" / "step_0000003" / "optimizer_1.bin", weights_only=True)["state"]
    assert all(int(s["step"]) == 2 for s in d_state.values())  # D stepped at steps 2 and 3 (disc_start=1)


# --- the GAN's wiring in real steps: the discriminator on from step 0, the log-variance learned
GAN = [*TINY, "train.max_steps=3", "train.tracker=none", "train.mixed_precision=no", "loss.disc_start=0",
       "loss.disc_ramp=0", "loss.learn_logvar=true"]  # fmt: skip


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    """One 3-step run, watched: the autoencoder built, the input of its decoder's last conv at each forward,
    and every `adaptive_weight` call the trainer makes (all observed, none changed)."""
    import training.step
    import training.train
    from training.config import load_config

    out = tmp_path_factory.mktemp("gan") / "run"
    built, last_input, calls = [], {}, []
    real_build, real_weight = training.train.build_autoencoder, training.step.adaptive_weight

    def build(cfg):
        model = real_build(cfg)
        model.decoder.conv_out.register_forward_hook(lambda m, args, y: last_input.update(h=args[0].detach()))
        built.append(model)
        return model

    def weight(recon, grad_nll, grad_adv, last_layer, **kwargs):
        value = real_weight(recon, grad_nll, grad_adv, last_layer, **kwargs)
        calls.append(dict(last_layer=last_layer, h=last_input["h"], grad_nll=grad_nll.detach(),
                          grad_adv=grad_adv.detach(), value=value))  # fmt: skip
        return value

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training.train, "build_autoencoder", build)
        mp.setattr(training.step, "adaptive_weight", weight)
        cfg = load_config(None, [*GAN, f"out_dir={out}"])
        summary = training.train.main(cfg)
    return dict(out=out, cfg=cfg, summary=summary, model=built[0], calls=calls, rows=read_jsonl(out / "metrics.jsonl"))


@pytest.mark.slow
def test_adaptive_weight_is_taken_at_the_decoders_last_layer(gan_run):
    """The logged train/d_weight is LDM's norm ratio at the decoder's conv_out, recomputed here by hand."""
    model, calls, rows = gan_run["model"], gan_run["calls"], gan_run["rows"]
    conv_out = model.decoder.conv_out
    assert len(calls) == 3 and [r["step"] for r in rows] == [1, 2, 3]
    for call, row in zip(calls, rows):
        assert call["last_layer"] is conv_out.weight is model.last_layer
        # the weight gradient of the conv that outputs the reconstruction, from its input and d(loss)/d(recon)
        at_w = [torch.nn.grad.conv2d_weight(call["h"], conv_out.weight.shape, g, padding=1)
                for g in (call["grad_nll"], call["grad_adv"])]  # fmt: skip
        ratio = (at_w[0].norm() / (at_w[1].norm() + 1e-4)).clamp(0, 1e4).item()
        assert call["value"].item() == pytest.approx(ratio, rel=1e-4)
        assert row["train/d_weight"] == pytest.approx(ratio * gan_run["cfg"].loss.disc_weight, rel=1e-4)


@pytest.mark.slow
def test_learned_logvar_is_optimized_in_a_real_run(gan_run):
    """loss.learn_logvar=true: the 0-dim logvar has AdamW state in the prepared optimizer, and it moves."""
    from safetensors.torch import load_file

    assert gan_run["cfg"].loss.logvar_init == 0.0
    logvars = [r["train/logvar"] for r in gan_run["rows"]]
    assert 0.0 not in logvars and len(set(logvars)) == 3  # every step moved it
    ckpt = gan_run["out"] / "checkpoints" / "step_0000003"
    assert load_file(ckpt / "model.safetensors")["logvar"].item() != 0.0
    state = torch.load(ckpt / "optimizer.bin", weights_only=True)["state"]
    assert sum(s["exp_avg"].dim() == 0 for s in state.values()) == 1  # logvar, the only 0-dim parameter
    assert all(int(s["step"]) == 3 for s in state.values())


@pytest.mark.slow
def test_a_skipped_discriminator_step_still_updates_the_autoencoder_and_its_ema(gan_run, tmp_path, monkeypatch):
    """Non-finite discriminator gradients at the last step skip the discriminator's update only: the autoencoder
    and its EMA end bit-identical to the run without them, and the step counts as a discriminator skip."""
    import training.step
    import training.train
    from tests.conftest import checkpoint_tensors
    from training.config import load_config

    real, calls = training.step.discriminator_objective, []

    def nan_at_step_3(*args, **kwargs):
        loss, logs = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), logs) if len(calls) == 3 else (loss, logs)

    monkeypatch.setattr(training.step, "discriminator_objective", nan_at_step_3)
    out = tmp_path / "nan_d"
    summary = training.train.main(load_config(None, [*GAN, f"out_dir={out}"]))
    assert summary["nonfinite_steps"] == 0 and summary["nonfinite_discriminator_steps"] == 1
    rows = read_jsonl(out / "metrics.jsonl")
    assert "train/loss" in rows[2] and "train/d_loss" not in rows[2]  # each model's logs masked by its own step
    assert all(v == v for r in rows for v in r.values())  # no NaN logged
    clean = checkpoint_tensors(gan_run["out"] / "checkpoints" / "step_0000003")
    nan_d = checkpoint_tensors(out / "checkpoints" / "step_0000003")
    same = [k for k in clean if k.startswith(("model/", "ema/")) and torch.equal(clean[k], nan_d[k])]
    assert len(same) == len([k for k in clean if k.startswith(("model/", "ema/"))])
    assert any(not torch.equal(clean[k], nan_d[k]) for k in clean if k.startswith("model_1/"))  # D skipped
