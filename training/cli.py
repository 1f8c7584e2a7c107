"""The `kl-ae` command line: the one place that knows the model, training and evaluation packages.

kl-ae train  [--config NAME|FILE] [--data SPEC] [--out DIR] [--max-steps N] [section.key=value ...]
kl-ae export RUN_DIR --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.checkpoint import NonFiniteError
from training.config import ConfigError


def export(run_dir: str, out: str) -> Path:
    """Write a diffusers folder from a run's latest complete checkpoint."""
    from kl_autoencoder import Autoencoder
    from training.checkpoint import find_latest_checkpoint

    run = Path(run_dir)
    checkpoint = find_latest_checkpoint(run) if (run / "checkpoints").is_dir() else None
    source = checkpoint / "autoencoder" if checkpoint is not None else run
    model = Autoencoder.from_pretrained(source)
    model.save_pretrained(out)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kl-ae", description="Train and export latent-diffusion autoencoders.")
    sub = parser.add_subparsers(dest="command", required=True)

    from training.train import add_train_arguments

    add_train_arguments(sub.add_parser("train", help="train an autoencoder (re-run the same command to resume)"))
    p_export = sub.add_parser("export", help="write a diffusers folder from a run's latest checkpoint")
    p_export.add_argument("run_dir")
    p_export.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    try:
        if args.command == "train":
            from training.train import config_from_args
            from training.train import main as train

            train(config_from_args(args))
        elif args.command == "export":
            print(f"diffusers folder: {export(args.run_dir, args.out)}")
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # the run stopped, its checkpoints intact
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
