"""The arguments of every `kl-ae` subcommand (`kl_ae/commands/cli.py` runs them)."""

from __future__ import annotations

import argparse
import sys

MODEL_HELP = "a run, checkpoint or diffusers folder, or a hub model name (org/name)"
SUBFOLDER_HELP = "the model's subfolder: vae for the VAE inside a pipeline (stabilityai/stable-diffusion-xl-base-1.0)"


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help=MODEL_HELP)
    p.add_argument("--subfolder", help=SUBFOLDER_HELP)


def add_export_command(sub) -> None:
    p = sub.add_parser("export", help="a diffusers folder with measured latent factors and a model card")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--data", help="measure the latent factors on SPEC (default: the run's validation split)")
    p.add_argument("--fp16-variant", action="store_true", help="also write diffusion_pytorch_model.fp16")
    p.add_argument("--max-images", type=int, default=256, help="held-out images to measure (default 256)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload the folder as this hub model repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--license", default="apache-2.0", help="the model card's license (default apache-2.0)")


def add_fetch_weights_command(sub) -> None:
    p = sub.add_parser(
        "fetch-weights", help="download and hash-check the pretrained files a recipe and kl-ae eval need"
    )
    p.add_argument("--config", help="the recipe (name or YAML file) whose LPIPS backbone to fetch (default: vgg)")
    p.add_argument("--what", default="lpips,fid",
                   help="comma-separated: lpips, fid, fvd, or file keys such as lpips-alex")  # fmt: skip


def add_info_command(sub) -> None:
    p = sub.add_parser("info", help="one screen about an autoencoder: family, factor, channels, normalization, sizes")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--subfolder", help=SUBFOLDER_HELP)


def add_latent_commands(sub) -> None:
    """reconstruct, encode and decode: using a trained model; shards: preparing data for a stream."""
    p = sub.add_parser(
        "reconstruct",
        help="encode and decode one image or video (tiled with --tile) and write a PNG, or a side-by-side video",
    )
    p.add_argument("image")
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--tile", type=int, help="tile size in pixels (a multiple of the downsampling factor; our model's "
                   "own tiling, else the diffusers class's enable_tiling where it has one)")  # fmt: skip
    p.add_argument("--frames", type=int, help="videos: frames per clip (default: the whole video, cut to the "
                   "longest length the model takes, e.g. 1 + 4k)")  # fmt: skip

    p = sub.add_parser("encode", help="write normalized latents of a data set as a datasets folder (load_from_disk)")
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="a folder of images or videos, a video file, shards, 'sample', "
                   "'sample-video' or a hub dataset name")  # fmt: skip
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, help="resize the shorter side and centre-crop to N (default: own size)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--frames", type=int, help="videos: frames per clip (default: the whole video, cut to the "
                   "longest length the model takes, e.g. 1 + 4k)")  # fmt: skip
    p.add_argument("--sample", action="store_true", help="posterior samples instead of the posterior mean")
    p.add_argument("--seed", type=int, default=0, help="posterior noise with --sample")
    p.add_argument(
        "--format", choices=["parquet", "webdataset"], help="a stream's latent shards: parquet (default) or .tar"
    )
    p.add_argument("--per-shard", type=int, default=1000, help="a stream's latents per shard file (default 1000)")
    p.add_argument("--streaming", action="store_true", help="stream a hub dataset (its train split) into shards")

    p = sub.add_parser("shards", help="write a folder of images as webdataset .tar shards (for --data)")
    p.add_argument("folder")
    p.add_argument("--out", required=True, help="the folder the shards go to (00000.tar, 00001.tar, ...)")
    p.add_argument("--per-shard", type=int, default=1000, help="images per shard (default 1000)")

    p = sub.add_parser("decode", help="decode a latent folder written by `kl-ae encode` back to PNG images")
    add_model_arguments(p)
    p.add_argument("--latents", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=8)


def add_eval_commands(sub) -> None:
    """The evaluation subcommands: eval, probe, rd, sanity (their packages are imported only when they run)."""
    p = sub.add_parser("eval", help="metrics, latent statistics, VAE diagnostics and an HTML report")
    add_model_arguments(p)
    p.add_argument("--data", help="a folder of images or videos, a video file, shards, 'sample', 'sample-video' or a "
                   "hub dataset name (default: a run's own held-out split)")  # fmt: skip
    p.add_argument("--streaming", action="store_true", help="stream a hub dataset of videos: its first clips")
    p.add_argument(
        "--split",
        choices=["val", "train"],
        default="val",
        help="'sample' or a hub dataset: the held-out images (default) or the training ones",
    )
    p.add_argument("--out", help="where metrics.json and report.html go (default MODEL/eval)")
    p.add_argument("--resolution", type=int, help="bring every image to N x N by --protocol (default: own size)")
    p.add_argument(
        "--protocol",
        choices=["torchvision", "adm"],
        default="torchvision",
        help="torchvision: Resize(N) + CenterCrop(N); adm: ADM's centre crop (BOX halvings, then BICUBIC)",
    )
    p.add_argument(
        "--posterior", choices=["mode", "sample"], default="mode", help="reconstruct from mode() or sample()"
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per batch and process (default 8)")
    p.add_argument("--compare", help="a second model (folder or hub name[/subfolder]) on the same images")
    p.add_argument("--lpips", choices=["required", "auto", "off"], default="auto")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images")
    p.add_argument("--frames", type=int, help="videos: frames per clip (default: the whole video, cut to the "
                   "longest length the model takes, e.g. 1 + 4k)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="posterior noise and the prior-comparison subsamples")

    p = sub.add_parser("probe", help="diffusability: train a small latent DiT on the model's latents, report its loss")
    add_model_arguments(p)
    p.add_argument("--data", help="a folder, 'sample' or a hub dataset name, split as the trainer splits it "
                   "(default: a run's own data and its held-out split); videos: also shards")  # fmt: skip
    p.add_argument("--streaming", action="store_true", help="stream a hub dataset of videos: its first clips")
    p.add_argument("--out", help="where metrics.json, report.html and the latents go (default MODEL/probe)")
    p.add_argument("--steps", type=int, default=600, help="denoiser training steps (default 600)")
    p.add_argument("--compare", help="a second model, probed on the same images, seeds and budget")
    p.add_argument("--seed", type=int, default=0, help="every random draw of the probe (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="latents per step over all processes (default 32)")
    p.add_argument("--resolution", type=int, help="crop size in px (default: the run's data.resolution)")
    p.add_argument("--resize", type=int, help="shorter side before cropping (default: the run's data.resize)")
    p.add_argument("--crops", type=int, default=4, help="a k x k grid of crops per image, each mirrored (default 4)")
    p.add_argument("--max-images", type=int, help="at most N images per split")
    p.add_argument("--frames", type=int, help="videos: frames per clip (default: the whole video, cut to the "
                   "longest length the model takes, e.g. 1 + 4k)")  # fmt: skip
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default steps / 8)")

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
        "--what",
        default="train,codec,data,peak,optim",
        help="comma-separated sections (also: default, tiled, maxbatch, fp16, families, dc-vs-sd, dc-step, "
        "formats-step, video-memory, video-data, video-train)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda where available, else cpu), cpu or cuda")
    p.add_argument("--tiled-sizes", default="1024,2048", help="tiled section: output sizes in px, comma-separated")
    p.add_argument("--tile", type=int, default=512, help="tiled section: tile size in output px")
    p.add_argument("--overlap", type=int, default=64, help="tiled section: tile overlap in output px")
    p.add_argument("--tiled-norms", default="tile,estimate,exact", help="tiled section: decode_tiled's norm modes")
    p.add_argument("--max-batch", type=int, default=1024, help="maxbatch section: the largest batch tried")
    p.add_argument(
        "--families",
        default="flux2,dc-ae,qwen-image,wan,hunyuan-image,rae,sd,sd3",
        help="families section: comma-separated autoencoder families (also on clips: wan-video, hunyuan-video, "
        "ltx-video, cogvideox)",
    )
    p.add_argument("--video-families", default="wan-video,hunyuan-video,ltx-video,cogvideox",
                   help="video-memory section: comma-separated video families")  # fmt: skip
    p.add_argument("--family-width", type=int, default=32, help="families section: first-level channels (SD's: 128)")
    p.add_argument("--seeds", default="0,1,2", help="dc-vs-sd section: comma-separated seeds, one pair of runs each")
    p.add_argument("--train-steps", type=int, default=300, help="dc-vs-sd section: optimizer steps of each run")
    add_model_arguments(p, required=False)  # codec and tiled sections: a trained KL model, the bundled photographs
    p.add_argument("--json", help="also write the results to this file")


def build_parser() -> argparse.ArgumentParser:
    from kl_ae.commands.inflate import add_inflate_command
    from kl_ae.commands.study import add_study_command
    from training.cli import add_train_arguments

    parser = argparse.ArgumentParser(prog="kl-ae", description="Train and export latent-diffusion autoencoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_arguments(sub.add_parser("train", help="train an autoencoder (re-run the same command to resume)"))
    add_export_command(sub)
    add_info_command(sub)
    add_fetch_weights_command(sub)
    add_eval_commands(sub)
    add_latent_commands(sub)
    add_bench_command(sub)
    add_study_command(sub)
    add_inflate_command(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with `section.key=value` overrides allowed anywhere among a subcommand's flags.

    argparse's intermixed parsing does that, but refuses a parser with subcommands; so the subcommand's own parser
    parses what follows its name, and the top-level parser only help and mistakes in the subcommand's name.
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # the subcommands' parsers (argparse exposes them only through its private action list)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if not argv or argv[0] not in commands:
        return parser.parse_args(argv)
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def model_of(args: argparse.Namespace) -> str | None:
    """`--model` with `--subfolder` appended: a local path or a hub name `org/name/subfolder`, as loaders take it."""
    if args.model is None or not args.subfolder:
        return args.model
    return f"{args.model.rstrip('/')}/{args.subfolder.strip('/')}"
