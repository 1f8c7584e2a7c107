"""`kl-ae rd`: a rate-distortion curve, one short training run per `loss.kl_weight`, each then evaluated.

The VAE loss is the rate-distortion Lagrangian D + beta R (the deep-dive's beta-VAE view): every kl_weight
picks one operating point. Each run is a normal run folder `<out>/kl_<weight>` trained by
`training.train.main`, so re-running the command resumes or reuses finished runs; each is evaluated on the
training config's data (`sample`: its held-out photos) at the training resolution. The rate is the KL in
bits per pixel, the distortion the MSE of the reconstructions in [0, 1].
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import PartialState

from eval.evaluate import EvalConfig, evaluate
from eval.report import save_rd_plot
from kl_ae.common.config import ConfigError
from training.config import load_config

# LDM's operating point (1e-6, where the KL costs almost nothing under the `sum` reduction) up to beta = 1;
# after a few hundred steps 1e-6 and 1e-3 still sit at the same rate, 0.1 and 1 visibly lower
DEFAULT_KL_WEIGHTS = "1e-6,1e-2,1"
DEFAULT_MAX_STEPS = 300  # the tiny recipe: ~1.5 min per weight at the default run's pace (1200 steps in ~6 min)


def parse_kl_weights(text: str) -> list[float]:
    """ "1e-6,1e-4" -> [1e-06, 0.0001]; a ConfigError for anything that is not a list of numbers >= 0."""
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"--kl-weights: expected comma-separated numbers, got {text!r}") from None
    if not weights or min(weights) < 0:
        raise ConfigError(f"--kl-weights: expected numbers >= 0, got {text!r}")
    return weights


def rate_distortion(
    kl_weights: list[float] | None = None,
    out: str | Path = "runs/rd",
    max_steps: int = DEFAULT_MAX_STEPS,
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict:
    """Train and evaluate one model per kl_weight; writes `<out>/rd.json` and `<out>/rd.png`, returns the json."""
    from training.train import main as train  # heavy; keeps `kl-ae rd --help` fast

    out = Path(out)
    kl_weights = kl_weights if kl_weights is not None else parse_kl_weights(DEFAULT_KL_WEIGHTS)
    # check every config before the first (long) training run starts
    runs = []
    for weight in kl_weights:
        run = out / f"kl_{weight:g}"
        extra = [f"loss.kl_weight={weight}", f"train.max_steps={max_steps}", f"out_dir={json.dumps(str(run))}"]
        runs.append((weight, run, load_config(config, [*overrides, *extra])))
    points = []
    for weight, run, cfg in runs:
        if train(cfg).get("interrupted"):  # SIGTERM / Ctrl-C: the run saved a checkpoint; stop the sweep too
            print(f"rate-distortion sweep stopped during {run}; re-run the same command to resume")
            return {"interrupted": True, "points": points}
        result = evaluate(
            EvalConfig(
                model=str(run),
                data=cfg.data.source,
                out=str(run / "eval"),
                resolution=cfg.data.resolution,
                batch_size=cfg.data.batch_size,
            )
        )
        rec, rate = result["reconstruction"], result["rate"]
        points.append(
            {
                "kl_weight": weight,
                "run": str(run),
                "bits_per_pixel": rate["bits_per_pixel"],
                "bits_per_latent_element": rate["bits_per_latent_element"],
                "kl_nats_per_image": rate["kl_nats_per_image"],
                "active_channels": rate["active_channels"],
                "mse": rec["mse"],
                "psnr": rec["psnr"],
                "ssim": rec["ssim"],
            }
        )
    summary = {"max_steps": max_steps, "config": config, "overrides": list(overrides), "points": points}
    if not PartialState().is_main_process:  # under `accelerate launch` one process writes
        return summary
    out.mkdir(parents=True, exist_ok=True)
    (out / "rd.json").write_text(json.dumps(summary, indent=1))
    save_rd_plot(points, out / "rd.png")
    for p in points:
        print(f"kl_weight {p['kl_weight']:g}: rate {p['bits_per_pixel']:.4g} bits/pixel, MSE {p['mse']:.5f}, "
              f"PSNR {p['psnr']:.2f} dB")  # fmt: skip
    print(f"rate-distortion curve: {out / 'rd.png'}")
    return summary
