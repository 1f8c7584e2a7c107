"""The `kl-ae` command line, the top layer: it alone imports both `training` and `eval`.

kl-ae train  [--config NAME|FILE] [--data SPEC] [--out DIR] [--max-steps N] [section.key=value ...]
kl-ae export RUN_DIR --out DIR [--data SPEC] [--fp16-variant] [--max-images N]
kl-ae reconstruct IMAGE --model PATH --out FILE [--tile N]
kl-ae encode --model PATH --data SPEC --out DIR [--resolution N] [--batch-size N] [--sample]
kl-ae decode --model PATH --latents DIR --out FOLDER
kl-ae eval   --model PATH --data SPEC [--out DIR] [--resolution N] [--compare PATH2] [--lpips MODE] ...
kl-ae rd     [--kl-weights 1e-6,1e-2,1] [--max-steps N] [--out DIR] [section.key=value ...]
kl-ae sanity [--seed N] [--steps N]
kl-ae bench  [--preset kl-f8] [--resolution 128] [--batch-size 2] [--steps N] [--precision fp32|bf16|both]
             [--what train,codec,data,peak,optim,tiled,maxbatch,fp16] [--device auto|cpu|cuda] [--model RUN]
             [--tiled-sizes 1024,2048] [--tiled-norms tile,estimate,exact] [--max-batch 1024]
             [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import ConfigError
from training.checkpoint import CheckpointWriteError, NonFiniteError


def export(run_dir: str, out: str, data: str | None = None, fp16_variant: bool = False, max_images: int = 256) -> Path:
    """A complete diffusers folder (measured latent factors, force_upcast, model card) from a run's latest
    checkpoint (its EMA weights), or from a checkpoint or diffusers folder."""
    from common.release import export_run
    from common.runs import latest_weights

    return export_run(latest_weights(run_dir), out, data=data, fp16_variant=fp16_variant, max_images=max_images)


def reconstruct(image: str, model_path: str, out: str, tile: int | None = None) -> Path:
    """Encode and decode one image (posterior mean), tiled when `tile` is given; writes a PNG."""
    import numpy as np
    import torch
    from PIL import Image

    from common.images import to_rgb
    from kl_autoencoder import Autoencoder
    from kl_autoencoder.tiling import decode_tiled, encode_tiled

    model = Autoencoder.from_pretrained(model_path)
    f = model.config.downsample_factor
    with Image.open(image) as img:
        img = to_rgb(img)
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
    h, w = x.shape[1] // f * f, x.shape[2] // f * f
    if h == 0 or w == 0:
        raise ConfigError(f"{image}: smaller than the downsampling factor {f}")
    x = x[None, :, :h, :w].float() / 127.5 - 1.0
    with torch.no_grad():
        if tile:
            y = decode_tiled(model, encode_tiled(model, x, tile).mode(), tile)
        else:
            y = model.decode(model.encode(x).mode())
    pixels = ((y[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(out, format="PNG")
    return Path(out)


def add_latent_commands(sub) -> None:
    """reconstruct, encode and decode: using a trained model."""
    p = sub.add_parser("reconstruct", help="encode and decode one image (tiled with --tile) and write a PNG")
    p.add_argument("image")
    p.add_argument("--model", required=True, help="a run folder, a checkpoint folder or a diffusers folder")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--tile", type=int, help="tile size in pixels (a multiple of the downsampling factor)")

    p = sub.add_parser("encode", help="write scaled latents of a data set as a datasets folder (load_from_disk)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="a folder (all its images), 'sample' or a hub dataset name")
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, help="resize the shorter side and centre-crop to N (default: own size)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sample", action="store_true", help="posterior samples instead of the posterior mean")
    p.add_argument("--seed", type=int, default=0, help="posterior noise with --sample")

    p = sub.add_parser("decode", help="decode a latent folder written by `kl-ae encode` back to PNG images")
    p.add_argument("--model", required=True)
    p.add_argument("--latents", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=8)


def run_latent_command(args: argparse.Namespace) -> int:
    if args.command == "reconstruct":
        print(f"reconstruction: {reconstruct(args.image, args.model, args.out, args.tile)}")
    elif args.command == "encode":
        from eval.latents import encode_dataset

        out = encode_dataset(args.model, args.data, args.out, args.resolution, args.batch_size, args.sample, args.seed)
        print(f"latents: {out}")
    else:
        from eval.latents import decode_dataset

        print(f"images: {decode_dataset(args.model, args.latents, args.out, args.batch_size)}")
    return 0


def add_eval_commands(sub) -> None:
    """The evaluation subcommands: eval, rd, sanity (their packages are imported only when they run)."""
    p = sub.add_parser("eval", help="metrics, latent statistics, VAE diagnostics and an HTML report")
    p.add_argument("--model", required=True, help="a run folder, a checkpoint folder or a diffusers folder")
    p.add_argument("--data", required=True, help="a folder (all its images), 'sample' or a hub dataset name")
    p.add_argument(
        "--split",
        choices=["val", "train"],
        default="val",
        help="'sample' or a hub dataset: the held-out images (default) or the training ones",
    )
    p.add_argument("--out", help="where metrics.json and report.html go (default MODEL/eval)")
    p.add_argument("--resolution", type=int, help="resize the shorter side and centre-crop to N (default: own size)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch and process (default 8)")
    p.add_argument("--compare", help="a second model, evaluated on the same images and shown side by side")
    p.add_argument("--lpips", choices=["required", "auto", "off"], default="auto")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images")
    p.add_argument("--seed", type=int, default=0, help="posterior noise and the prior-comparison subsamples")

    p = sub.add_parser("rd", help="rate-distortion curve: train and evaluate one model per kl_weight")
    p.add_argument("--kl-weights", default="1e-6,1e-2,1", help="comma-separated loss.kl_weight values")
    p.add_argument("--max-steps", type=int, default=300, help="training steps per weight (default 300)")
    p.add_argument("--out", default="runs/rd", help="runs go to OUT/kl_<weight>, the curve to OUT/rd.png")
    p.add_argument("--config", help="a recipe name or YAML file for every run (default: the tiny CPU recipe)")
    p.add_argument("--data", help="shorthand for data.source=SPEC")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")

    p = sub.add_parser("sanity", help="a linear VAE trained with our losses must recover probabilistic PCA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500, help="full-batch Adam steps (default 1500)")


def run_eval_command(args: argparse.Namespace) -> int:
    if args.command == "eval":
        from eval.evaluate import EvalConfig, evaluate

        fields = ("model", "data", "split", "out", "resolution", "batch_size", "compare", "lpips", "max_images", "seed")
        evaluate(EvalConfig(**{k: getattr(args, k) for k in fields}))
        return 0
    if args.command == "rd":
        import json

        from commands.rd import parse_kl_weights, rate_distortion

        if args.max_steps < 1:
            raise ConfigError(f"--max-steps: must be >= 1, got {args.max_steps}")
        overrides = [*args.overrides, *([f"data.source={json.dumps(args.data)}"] if args.data else [])]
        rate_distortion(parse_kl_weights(args.kl_weights), args.out, args.max_steps, args.config, overrides)
        return 0
    from training.sanity import SanityConfig, run_sanity

    if args.steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {args.steps}")
    r = run_sanity(SanityConfig(seed=args.seed, steps=args.steps))
    c = r["config"]
    print(f"linear VAE vs closed-form pPCA (D={c['data_dim']}, d={c['latent_dim']}, N={c['num_samples']}, "
          f"noise variance {c['noise_var']:g}, {c['steps']} Adam steps)")  # fmt: skip
    angles = ", ".join(f"{a:.3f}" for a in r["angles_deg"])
    print(f"principal angles decoder vs W_ML: {angles} degrees (pass: all < {c['max_angle_deg']:g})")
    print(f"noise variance: exp(logvar) {r['sigma2_vae']:.5f}, sigma^2_ML {r['sigma2_ml']:.5f}, "
          f"relative error {100 * r['sigma2_rel_error']:.2f}% (pass: < {100 * c['max_var_rel_error']:g}%)")  # fmt: skip
    print(f"ELBO {r['elbo_nats']:.4f} nats vs pPCA log-likelihood {r['ppca_log_likelihood_nats']:.4f} nats per sample")
    print("sanity check " + ("PASSED" if r["passed"] else "FAILED"))
    return 0 if r["passed"] else 1


def add_bench_command(sub) -> None:
    p = sub.add_parser("bench", help="training-step, codec and data throughput against baselines in the same run")
    p.add_argument("--preset", default="kl-f8")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per measurement (default 2)")
    p.add_argument(
        "--repeats", type=int, default=3, help="interleaved repetitions; medians are reported (FLOP fraction: the best)"
    )
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument(
        "--what", default="train,codec,data,peak,optim", help="comma-separated sections (also: tiled, maxbatch, fp16)"
    )
    p.add_argument("--device", default="auto", help="auto (cuda where available, else cpu), cpu or cuda")
    p.add_argument("--tiled-sizes", default="1024,2048", help="tiled section: output sizes in px, comma-separated")
    p.add_argument("--tile", type=int, default=512, help="tiled section: tile size in output px")
    p.add_argument("--overlap", type=int, default=64, help="tiled section: tile overlap in output px")
    p.add_argument("--tiled-norms", default="tile,estimate,exact", help="tiled section: decode_tiled's norm modes")
    p.add_argument("--max-batch", type=int, default=1024, help="maxbatch section: the largest batch tried")
    p.add_argument("--model", help="codec, tiled sections: a trained KL model (run or folder), the bundled photos")
    p.add_argument("--json", help="also write the results to this file")


def run_bench_command(args: argparse.Namespace) -> int:
    import json

    from commands.bench import BenchConfig, format_table, run_bench
    from commands.bench_device import resolve_device
    from kl_autoencoder import PRESETS

    if args.preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    for name in ("resolution", "batch_size", "steps", "repeats", "max_batch"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    what = tuple(w.strip() for w in args.what.split(",") if w.strip())
    try:
        sizes = tuple(int(v) for v in args.tiled_sizes.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--tiled-sizes: comma-separated integers, got {args.tiled_sizes!r}") from None
    f = PRESETS[args.preset].downsample_factor
    if not sizes or any(v < 1 or v % f for v in sizes):
        raise ConfigError(f"--tiled-sizes: positive multiples of the downsampling factor {f}, got {args.tiled_sizes}")
    norms = tuple(n.strip() for n in args.tiled_norms.split(",") if n.strip())
    fields = dict(preset=args.preset, resolution=args.resolution, batch_size=args.batch_size, steps=args.steps,
                  tiled_sizes=sizes, tile=args.tile, overlap=args.overlap, tiled_norms=norms, model=args.model,
                  max_batch=args.max_batch)  # fmt: skip
    try:
        device = resolve_device(args.device)
        result = run_bench(
            BenchConfig(**fields, repeats=args.repeats, precision=args.precision, what=what, device=device)
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(format_table(result))
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kl-ae", description="Train and export latent-diffusion autoencoders.")
    sub = parser.add_subparsers(dest="command", required=True)

    from training.cli import add_train_arguments

    add_train_arguments(sub.add_parser("train", help="train an autoencoder (re-run the same command to resume)"))
    p_export = sub.add_parser("export", help="a diffusers folder with measured latent factors and a model card")
    p_export.add_argument("run_dir")
    p_export.add_argument("--out", required=True)
    p_export.add_argument("--data", help="measure the latent factors on SPEC (default: the run's validation split)")
    p_export.add_argument("--fp16-variant", action="store_true", help="also write diffusion_pytorch_model.fp16")
    p_export.add_argument("--max-images", type=int, default=256, help="held-out images to measure (default 256)")
    add_eval_commands(sub)
    add_latent_commands(sub)
    add_bench_command(sub)
    args = parser.parse_args(argv)

    try:
        if args.command == "train":
            from training.cli import config_from_args
            from training.train import main as train

            train(config_from_args(args))
        elif args.command == "export":
            out = export(args.run_dir, args.out, args.data, args.fp16_variant, args.max_images)
            print(f"diffusers folder: {out}")
        elif args.command in ("reconstruct", "encode", "decode"):
            return run_latent_command(args)
        elif args.command == "bench":
            return run_bench_command(args)
        else:
            return run_eval_command(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, CheckpointWriteError) as e:  # the run stopped, its checkpoints intact
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
