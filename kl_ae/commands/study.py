"""`kl-ae study`: does a latent-shaping regularizer make a better latent space? Plain training against each
weight-free regularizer, at equal budget, over several seeds, with mean and standard error of every measure.

Each (variant, seed) is a normal run folder `OUT/<variant>_s<seed>` trained by `training.train.main` (so re-running
resumes or reuses finished runs), then evaluated by `kl-ae eval` on the held-out images of the training data at
their own size (reconstruction PSNR, equivariance gaps, high-frequency share) and, unless `--probe-steps 0`, probed
by `kl-ae probe` (held-out denoising loss of a small diffusion model trained on its latents). Writes
`OUT/study.json` (every run's numbers, the per-variant summaries, and each variant's paired difference from
`plain`) and prints the tables. A seed fixes a run's initialisation, data order and held-out split (the probe's
crops too), so runs of one seed are paired: the difference from `plain` seed by seed has a smaller standard
error than the two means' difference whenever the seeds themselves move a measure.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from kl_ae.common.config import ConfigError
from training.config import load_config

# the weight-free regularizers (the VF loss needs a foundation model's weights), at settings that are documented
# in README ("Is my latent space good for diffusion?")
VARIANTS = {
    "plain": [],
    "eq": ["loss.eq_weight=1.0", "loss.eq_prob=0.5"],
    "noise": ["loss.latent_noise=0.25"],
    "mask": ["loss.channel_mask=0.5"],
}
MEASURES = {  # name in study.json -> (where in eval's / probe's metrics.json, what it is)
    "psnr": (("reconstruction", "psnr"), "held-out reconstruction PSNR (dB)"),
    "gap_scale": (("geometry", "gap_scale_db"), "equivariance gap, downscaling x2 (dB)"),
    "gap_rotation": (("geometry", "gap_rotation_db"), "equivariance gap, rotations (dB)"),
    "psnr_decode_downscaled": (
        ("geometry", "equivariance", "scale", "psnr_decode_transformed"),
        "PSNR of decode(downscaled z) vs downscaled x (dB)",
    ),
    "hf_share": (("geometry", "spectrum", "latent_high_frequency_share"), "latent power above Nyquist / 2"),
    "probe_loss": (("probe", "heldout_loss", "mean"), "probe: held-out denoising loss per latent element"),
    "probe_ratio": (("probe", "heldout_loss", "mean_ratio"), "probe: held-out loss / the Gaussian baseline's"),
}


def parse_list(text: str, name: str, cast=str) -> list:
    try:
        values = [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{name}: comma-separated values, got {text!r}") from None
    if not values:
        raise ConfigError(f"--{name}: at least one value")
    return values


def mean_se(values: list[float | None]) -> dict:
    """Mean and standard error (sample std / sqrt(n)) of the available values."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": None, "se": None, "n": 0}
    se = statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else None
    return {"mean": statistics.fmean(v), "se": se, "n": len(v)}


def paired(results: list[dict], variants: list[str], baseline: str = "plain") -> dict:
    """Per variant other than `baseline`, per measure: mean and standard error of (variant - baseline) over the
    seeds both ran."""
    rows = {(r["variant"], r["seed"]): r for r in results}
    out = {}
    for v in variants:
        if v == baseline:
            continue
        seeds = [s for (w, s) in rows if w == v and (baseline, s) in rows]
        out[v] = {
            name: mean_se(
                [
                    None
                    if rows[(v, s)][name] is None or rows[(baseline, s)][name] is None
                    else rows[(v, s)][name] - rows[(baseline, s)][name]
                    for s in seeds
                ]
            )
            for name in MEASURES
        }
    return out


def _lookup(result: dict, keys: tuple[str, ...]):
    for key in keys:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def study(
    out: str | Path = "runs/study",
    variants: list[str] | None = None,
    seeds: list[int] | None = None,
    max_steps: int | None = None,
    probe_steps: int | None = None,
    eval_resolution: int | None = None,
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict:
    """Train, evaluate and probe every (variant, seed); write and return OUT/study.json."""
    from eval.evaluate import EvalConfig, evaluate
    from training.train import main as train

    out = Path(out)
    variants = variants or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    seeds = seeds if seeds is not None else [0, 1, 2]
    runs = []  # every config is checked before the first (long) training starts
    for variant in variants:
        for seed in seeds:
            run = out / f"{variant}_s{seed}"
            extra = [*VARIANTS[variant], f"train.seed={seed}", f"out_dir={run}"]
            extra += [f"train.max_steps={max_steps}"] if max_steps else []
            runs.append((variant, seed, run, load_config(config, [*overrides, *extra])))
    results = []
    for variant, seed, run, cfg in runs:
        if train(cfg).get("interrupted"):
            print(f"study stopped during {run}; re-run the same command to resume")
            return {"interrupted": True}
        evaluation = evaluate(EvalConfig(model=str(run), data=cfg.data.source, out=str(run / "eval"), lpips="off",
                                         resolution=eval_resolution))  # fmt: skip
        metrics = {"reconstruction": evaluation["reconstruction"], "geometry": evaluation["geometry"]}
        if probe_steps != 0:
            metrics["probe"] = run_probe(run, cfg.data.source, probe_steps)
        row = {"variant": variant, "seed": seed, "run": str(run)}
        row |= {name: _lookup(metrics, keys) for name, (keys, _) in MEASURES.items()}
        results.append(row)
    summary = {
        v: {name: mean_se([r[name] for r in results if r["variant"] == v]) for name in MEASURES} for v in variants
    }
    differences = paired(results, variants) if "plain" in variants else {}
    report = {"config": config, "overrides": list(overrides), "max_steps": max_steps, "seeds": seeds,
              "eval_resolution": eval_resolution,
              "variants": {v: VARIANTS[v] for v in variants}, "measures": {k: d for k, (_, d) in MEASURES.items()},
              "runs": results, "summary": summary, "minus_plain": differences}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(report, indent=1))
    print(format_table(summary))
    if differences:
        print("\nminus plain, paired by seed:\n" + format_table(differences))
    return report


def run_probe(run: Path, data: str, steps: int | None) -> dict:
    """The probe's summary for one run (see `kl-ae probe`)."""
    from eval.probe import ProbeConfig, probe

    settings = {"steps": steps} if steps else {}
    result = probe(ProbeConfig(model=str(run), data=data, out=str(run / "probe"), **settings))
    return {"heldout_loss": {k: result["heldout_loss"][k] for k in ("mean", "mean_ratio")}}


def format_table(summary: dict) -> str:
    """A Markdown table: one row per variant, mean ± standard error per measure."""

    def cell(s: dict) -> str:
        if s["mean"] is None:
            return "n/a"
        return f"{s['mean']:.4g}" + (f" ± {s['se']:.2g}" if s["se"] is not None else "")

    names = [n for n in MEASURES if any(n in s for s in summary.values())]
    lines = ["| variant | " + " | ".join(MEASURES[n][1] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {v} | " + " | ".join(cell(s[n]) for n in names) + " |" for v, s in summary.items()]
    return "\n".join(lines)


def add_study_command(sub) -> None:
    p = sub.add_parser("study", help="plain training vs each latent-shaping regularizer over seeds, mean ± SE")
    p.add_argument("--out", default="runs/study", help="runs go to OUT/<variant>_s<seed>, the summary to OUT")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--max-steps", type=int, help="training steps per run (default: the recipe's)")
    p.add_argument("--probe-steps", type=int, help="probe training steps (default: the probe's; 0: no probe)")
    p.add_argument("--eval-resolution", type=int, help="evaluate at N px (default: the held-out images' own size)")
    p.add_argument("--config", help="a recipe name or YAML file for every run (default: the tiny CPU recipe)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")


def run_study_command(args) -> int:
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps: must be >= 1, got {args.max_steps}")
    if args.probe_steps is not None and args.probe_steps < 0:
        raise ConfigError(f"--probe-steps: must be >= 0, got {args.probe_steps}")
    seeds = parse_list(args.seeds, "seeds", int)
    variants = parse_list(args.variants, "variants")
    study(args.out, variants, seeds, args.max_steps, args.probe_steps, args.eval_resolution, args.config,
          args.overrides)  # fmt: skip
    return 0
