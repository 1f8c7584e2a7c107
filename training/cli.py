"""`kl-ae train` / `python -m training.train`: the training command's arguments, turned into a `TrainConfig`.

kl-ae train [--config NAME|FILE] [--data SPEC] [--out DIR] [--max-steps N] [--trust-pickle] [section.key=value ...]

The arguments only: running the config is `training.train`'s (its `cli`), so this module never imports it.
"""

from __future__ import annotations

import argparse

from training.config import TrainConfig, load_config


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a recipe name (tiny, kl-f8, ...) or a YAML file")
    parser.add_argument("--data", help="a folder of images, shards ('DIR/{00000..00127}.tar'), a hub name, or 'sample'")
    parser.add_argument("--out", help="the run folder (default runs/default)")
    parser.add_argument("--max-steps", type=int, help="shorthand for train.max_steps=N")
    parser.add_argument(
        "--trust-pickle", action="store_true", help="let model.init_from unpickle a .ckpt file (only files you trust)"
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The recipe, then the `section.key=value` overrides, then the shorthand flags (string keys stay strings:
    `--data 123` is a folder name, not a number)."""
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.source={args.data}")
    if args.out is not None:
        overrides.append(f"out_dir={args.out}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.trust_pickle:
        overrides.append("model.trust_pickle=true")
    return load_config(args.config, overrides)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The config the command line `argv` asks for (a ConfigError for a bad key or value)."""
    parser = argparse.ArgumentParser(prog="kl-ae train", description="Train a KL autoencoder.")
    add_train_arguments(parser)
    return config_from_args(parser.parse_intermixed_args(argv))
