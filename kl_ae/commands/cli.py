"""The `kl-ae` command line. It lives in the top layer, `kl_ae/commands/`, the only package that may import both
`training` and `eval`.

kl-ae train  [--config NAME|FILE] [--data SPEC] [--out DIR] [--max-steps N] [section.key=value ...]
kl-ae export RUN_DIR --out DIR [--data SPEC] [--fp16-variant] [--max-images N] [--push-to-hub REPO_ID [--private]]
kl-ae fetch-weights [--config NAME] [--what lpips,fid]
kl-ae info   MODEL [--subfolder SUB]
kl-ae reconstruct IMAGE --model PATH [--subfolder SUB] --out FILE [--tile N]
kl-ae encode --model PATH [--subfolder SUB] --data SPEC --out DIR [--resolution N] [--batch-size N] [--sample]
             [--format parquet|webdataset] [--per-shard N] [--streaming]
kl-ae shards FOLDER --out DIR [--per-shard N]
kl-ae decode --model PATH [--subfolder SUB] --latents DIR --out FOLDER
kl-ae eval   --model PATH [--subfolder SUB] --data SPEC [--out DIR] [--resolution N] [--protocol torchvision|adm]
             [--posterior mode|sample] [--compare PATH2] [--lpips MODE] ...
kl-ae probe  --model PATH [--data SPEC] [--out DIR] [--steps N] [--compare PATH2] [--seed N] [--batch-size N] ...
kl-ae rd     [--kl-weights 1e-6,1e-2,1] [--max-steps N] [--out DIR] [section.key=value ...]
kl-ae sanity [--seed N] [--steps N]
kl-ae inflate IMAGE_MODEL --out DIR [--subfolder SUB] [--temporal-factor 4]
kl-ae study  [--variants plain,eq,noise,mask] [--seeds 0,1,2] [--max-steps N] [--probe-steps N] [--out DIR]
kl-ae bench  [--preset kl-f8] [--resolution 128] [--batch-size 2] [--steps N] [--precision fp32|bf16|both]
             [--what train,codec,data,peak,optim,tiled,maxbatch,fp16,families] [--device auto|cpu|cuda] [--model RUN]
             [--tiled-sizes 1024,2048] [--tiled-norms tile,estimate,exact] [--max-batch 1024] [--json FILE]
             [--families flux2,dc-ae,qwen-image,wan,hunyuan-image,rae,sd,sd3] [--family-width 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kl_ae.commands.args import model_of, parse_args
from kl_ae.commands.study import run_study_command
from kl_ae.common.config import ConfigError
from training.checkpoint import CheckpointWriteError, NonFiniteError


def export(
    run_dir: str,
    out: str,
    data: str | None = None,
    fp16_variant: bool = False,
    max_images: int = 256,
    license: str = "apache-2.0",
) -> Path:
    """A complete diffusers folder (measured latent factors, force_upcast, model card with hub metadata) from a
    run's latest checkpoint (its EMA weights), or from a checkpoint or diffusers folder."""
    from kl_ae.common.release import export_run
    from kl_ae.common.runs import latest_weights

    source = latest_weights(run_dir)
    return export_run(source, out, data=data, fp16_variant=fp16_variant, max_images=max_images, license=license)


def run_export_command(args: argparse.Namespace) -> int:
    from kl_ae.common.release import PushError, push_to_hub

    if args.private and not args.push_to_hub:
        raise ConfigError("--private: only with --push-to-hub REPO_ID")
    out = export(args.run_dir, args.out, args.data, args.fp16_variant, args.max_images, args.license)
    print(f"diffusers folder: {out}")
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private)
        except PushError as e:  # the folder is written; only the upload is missing
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"uploaded: {url}")
    return 0


def run_latent_command(args: argparse.Namespace) -> int:
    if args.command == "shards":  # prepares data: no model
        from kl_ae.common.shards import write_shards

        pattern = write_shards(args.folder, args.out, args.per_shard)
        print(f"shards: {pattern}\ntrain on them with --data '{pattern}'")
        return 0
    model = model_of(args)
    if args.command == "reconstruct":
        from eval.reconstruct import reconstruct

        print(f"reconstruction: {reconstruct(args.image, model, args.out, args.tile, args.frames)}")
    elif args.command == "encode":
        from eval.latents import encode_dataset

        options = (args.resolution, args.batch_size, args.sample, args.seed)
        shards = dict(fmt=args.format, per_shard=args.per_shard, streaming=args.streaming, frames=args.frames)
        print(f"latents: {encode_dataset(model, args.data, args.out, *options, **shards)}")
    else:
        from eval.latents import decode_dataset

        print(f"images: {decode_dataset(model, args.latents, args.out, args.batch_size)}")
    return 0


def run_eval_command(args: argparse.Namespace) -> int:
    if args.command == "eval":
        from eval.evaluate import EvalConfig, evaluate

        fields = ("data", "split", "out", "resolution", "protocol", "posterior", "batch_size", "compare", "lpips",
                  "max_images", "seed", "frames", "streaming")  # fmt: skip
        evaluate(EvalConfig(model=model_of(args), **{k: getattr(args, k) for k in fields}))
        return 0
    if args.command == "probe":
        from eval.probe import ProbeConfig, probe

        fields = ("data", "out", "steps", "compare", "seed", "batch_size", "resolution", "resize", "crops",
                  "max_images", "eval_every", "frames", "streaming")  # fmt: skip
        probe(ProbeConfig(model=model_of(args), **{k: getattr(args, k) for k in fields}))
        return 0
    if args.command == "rd":
        import json

        from kl_ae.commands.rd import parse_kl_weights, rate_distortion

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


def run_bench_command(args: argparse.Namespace) -> int:
    import json

    from kl_ae.bench.device import resolve_device
    from kl_ae.bench.run import BenchConfig, format_table, run_bench
    from kl_autoencoder import PRESETS

    if args.preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    for name in ("resolution", "batch_size", "steps", "repeats", "max_batch", "train_steps"):
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
    try:
        seeds = tuple(int(v) for v in args.seeds.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--seeds: comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise ConfigError("--seeds: at least one seed")
    fields = dict(preset=args.preset, resolution=args.resolution, batch_size=args.batch_size, steps=args.steps,
                  tiled_sizes=sizes, tile=args.tile, overlap=args.overlap, tiled_norms=norms, model=model_of(args),
                  max_batch=args.max_batch, family_width=args.family_width, seeds=seeds, train_steps=args.train_steps,
                  families=tuple(f.strip() for f in args.families.split(",") if f.strip()),
                  video_families=tuple(f.strip() for f in args.video_families.split(",") if f.strip()))  # fmt: skip
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
    args = parse_args(argv)

    try:
        if args.command == "train":
            from training.cli import config_from_args
            from training.train import main as train

            train(config_from_args(args))
        elif args.command == "export":
            return run_export_command(args)
        elif args.command == "fetch-weights":
            from kl_ae.commands.fetch_weights import fetch_weights

            return 0 if fetch_weights(args.config, args.what) else 1
        elif args.command in ("reconstruct", "encode", "decode", "shards"):
            return run_latent_command(args)
        elif args.command == "bench":
            return run_bench_command(args)
        elif args.command == "study":
            return run_study_command(args)
        elif args.command == "inflate":
            from kl_ae.commands.inflate import run_inflate_command

            return run_inflate_command(args)
        elif args.command == "info":
            from kl_ae.commands.info import run_info_command

            return run_info_command(args)
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
