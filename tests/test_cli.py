"""The `kl-ae` command line: `section.key=value` overrides anywhere among a subcommand's flags."""

import pytest

from kl_ae.commands.args import parse_args
from training.cli import config_from_args


def test_overrides_may_sit_anywhere_among_the_flags(tmp_path):
    out = str(tmp_path / "r")
    args = parse_args(["train", "--out", out, "data.batch_size=4", "--max-steps", "2", "train.seed=1"])
    assert args.command == "train" and args.overrides == ["data.batch_size=4", "train.seed=1"]
    cfg = config_from_args(args)
    assert (cfg.data.batch_size, cfg.train.seed, cfg.train.max_steps, cfg.out_dir) == (4, 1, 2, out)
    for command in ("rd", "study"):
        args = parse_args([command, "loss.kl_weight=1", "--max-steps", "3", "train.seed=2", "--out", out])
        assert args.overrides == ["loss.kl_weight=1", "train.seed=2"] and args.max_steps == 3


def test_mistakes_are_still_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["train", "--max-steps", "two"])
    assert exit_.value.code == 2 and "kl-ae train: error: argument --max-steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["tran"])
    assert "invalid choice: 'tran'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        parse_args(["export", "run", "--out", "x", "extra"])
    assert exit_.value.code == 2 and "unrecognized arguments: extra" in capsys.readouterr().err
