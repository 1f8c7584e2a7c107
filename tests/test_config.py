"""Configs: defaults, recipes, overrides, and a clear one-line error for every mistake."""

import ast
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import yaml

from training.config import ConfigError, TrainConfig, load_config, parse_override, recipe_names, save_config

ROOT = Path(__file__).resolve().parents[1]


def all_keys(obj, prefix=""):
    out = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        out += all_keys(value, f"{prefix}{f.name}.") if is_dataclass(value) else [f"{prefix}{f.name}"]
    return out


def test_field_list_is_pinned():
    # a new key must be added here on purpose, documented (docs/configuration.md) and read by the code
    assert all_keys(TrainConfig()) == [
        "model.preset", "model.base_channels", "model.channel_mult", "model.layers_per_block",
        "model.latent_channels", "model.norm_num_groups", "model.num_codes", "model.code_dim",
        "model.normalize_codes", "model.family", "model.arch", "model.init_from", "model.trust_pickle",
        "model.gradient_checkpointing", "model.per_frame",
        "data.source", "data.resolution", "data.resize", "data.random_crop", "data.hflip", "data.batch_size",
        "data.num_workers", "data.val_fraction", "data.val_max", "data.val_source", "data.streaming",
        "data.shuffle_buffer", "data.image_column", "data.hub_split",
        "data.repeats", "data.small_images", "data.max_pixels", "data.num_frames", "data.frame_stride", "data.fps",
        "data.image_ratio", "data.channels", "data.value_range", "data.channel_mismatch",
        "loss.rec_loss", "loss.perceptual_weight", "loss.lpips", "loss.lpips_net", "loss.lpips_weights",
        "loss.lpips_autocast", "loss.lpips_frames", "loss.lpips_channels",
        "loss.learn_logvar", "loss.logvar_init", "loss.kl_weight", "loss.reduction",
        "loss.kl_anneal_steps", "loss.free_bits", "loss.gan_loss", "loss.disc_weight", "loss.disc_start",
        "loss.disc_ramp", "loss.disc_norm", "loss.disc_channels", "loss.disc_layers", "loss.disc_dims",
        "loss.codebook_weight",
        "loss.eq_weight", "loss.eq_prob", "loss.eq_transforms", "loss.latent_noise", "loss.channel_mask",
        "loss.align_weight", "loss.align_model", "loss.align",
        "optim.lr", "optim.disc_lr", "optim.betas", "optim.weight_decay", "optim.warmup_steps", "optim.schedule",
        "optim.min_lr_ratio", "optim.grad_clip",
        "optim.scale_lr",
        "train.max_steps", "train.grad_accum", "train.log_every", "train.sample_every", "train.checkpoint_every",
        "train.eval_every", "train.keep_checkpoints", "train.mixed_precision", "train.seed", "train.tracker",
        "train.ema", "train.ema_decay", "train.max_nonfinite", "train.trainable", "train.compile",
        "train.max_time", "train.export",
        "vq.beta", "vq.legacy_loss", "vq.codebook", "vq.decay", "vq.dead_after", "vq.window", "vq.buffer_size",
        "out_dir",
    ]  # fmt: skip


def config_classes() -> set[str]:
    """The names of TrainConfig and the dataclasses of its sections (and the classes they derive from)."""
    cfg = TrainConfig()
    sections = [type(v) for f in fields(cfg) if is_dataclass(v := getattr(cfg, f.name))]
    return {"TrainConfig"} | {c.__name__ for s in sections for c in s.__mro__ if is_dataclass(c)}


def reads(tree: ast.AST, skip: set[str]) -> set[str]:
    """Attribute names read in `tree` (`x.name`, `getattr(x, "name")`), leaving out the checks in the classes
    `skip` (`validate`, `__post_init__`): a field that is only defined and validated is not used. Their other
    methods (`ModelConfig.autoencoder_config()`, ...) are uses."""
    found = set()

    def visit(node: ast.AST, in_config: bool = False) -> None:
        if in_config and isinstance(node, ast.FunctionDef) and node.name in ("validate", "__post_init__"):
            return
        in_config = in_config or (isinstance(node, ast.ClassDef) and node.name in skip)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            found.add(node.attr)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) > 1:
            if isinstance(node.args[1], ast.Constant):
                found.add(node.args[1].value)
        for child in ast.iter_child_nodes(node):
            visit(child, in_config)

    visit(tree)
    return found


def unread_keys(root: Path = ROOT) -> list[str]:
    """The config keys that no code of the trainer reads. data.* is read in kl_ae/common/ (shared with eval),
    vq.* in the quantizer; a model.* override of a preset field is read by `autoencoder_config()`, which hands
    every such field to the preset's `AutoencoderConfig`."""
    from kl_autoencoder import AutoencoderConfig

    sources = [*(root / "training").glob("*.py"), *(root / "kl_ae" / "common").glob("*.py")]
    sources += (root / "kl_autoencoder").glob("*.py")
    skip = config_classes()
    read = set().union(*(reads(ast.parse(p.read_text()), skip) for p in sources))
    preset_fields = {f.name for f in fields(AutoencoderConfig)}
    unread = []
    for key in all_keys(TrainConfig()):
        section, _, name = key.rpartition(".")
        if name not in read and not (section == "model" and name in preset_fields):
            unread.append(key)
    return unread


def test_every_field_is_read():
    assert not unread_keys(), f"never read: {unread_keys()}"


def test_every_field_is_documented():
    from kl_ae.commands.config_table import BEGIN, END

    text = (ROOT / "docs" / "configuration.md").read_text()
    generated = text[text.index(BEGIN) : text.index(END)]
    for key in all_keys(TrainConfig()):
        assert f"| `{key}` |" in generated, f"{key} is not in docs/configuration.md's tables"


def test_configuration_tables_are_generated():
    # regenerate with `python -m kl_ae.commands.config_table --write docs/configuration.md`
    from kl_ae.commands.config_table import BEGIN, END, tables

    text = (ROOT / "docs" / "configuration.md").read_text()
    assert BEGIN in text and END in text, "docs/configuration.md lost its generated tables' markers"
    written = text[text.index(BEGIN) : text.index(END) + len(END) + 1]
    assert written == tables(), "docs/configuration.md differs from the dataclasses: regenerate it"


def test_defaults_are_the_tiny_recipe():
    assert load_config() == load_config("tiny")


@pytest.mark.parametrize("name", ["tiny", "kl-f8", "kl-f8-c16", "kl-f4", "kl-f16", "tiny-vq", "vq-f4", "vq-f8"])
def test_every_recipe_loads_and_builds_its_preset(name):
    import torch

    from kl_autoencoder import PRESETS, Autoencoder

    cfg = load_config(name)
    assert cfg.model.preset == name
    assert name in recipe_names()
    assert cfg.model.autoencoder_config() == PRESETS[name]  # a recipe trains its preset as it stands
    with torch.device("meta"):  # the full-size architecture, without allocating its weights
        model = Autoencoder(cfg.model.autoencoder_config(), vq=cfg.vq)
    preset = PRESETS[name]
    assert model.config.bottleneck == preset.bottleneck == ("vq" if "vq" in name else "kl")
    if preset.bottleneck == "vq":
        assert model.quantize.embedding.weight.shape == (preset.num_codes, preset.code_dim)
        assert (model.quantize.config.codebook, model.quantize.config.beta) == (cfg.vq.codebook, cfg.vq.beta)
    else:
        assert model.encoder.conv_out.out_channels == 2 * preset.latent_channels  # mean and log-variance


def test_diffusability_recipes(tmp_path):
    vf = load_config("kl-f16-c32-vf")
    ae = vf.model.autoencoder_config()
    assert (ae.downsample_factor, ae.latent_channels, vf.loss.align_weight, vf.loss.align) == (16, 32, 0.1, "required")
    eq = load_config("ft-eq", [f"model.init_from={tmp_path}"])
    assert eq.loss.eq_weight > 0 and eq.train.trainable == "all" and eq.train.ema and eq.model.preset == "kl-f8"


@pytest.mark.parametrize("name", ["ft-ema", "ft-mse"])
def test_finetune_recipes_are_decoder_only_with_ema(name, tmp_path):
    with pytest.raises(ConfigError, match="needs model.init_from"):
        load_config(name)
    cfg = load_config(name, [f"model.init_from={tmp_path}"])
    assert cfg.train.trainable == "decoder" and cfg.train.ema and cfg.model.preset == "kl-f8"
    assert (cfg.loss.rec_loss, cfg.loss.perceptual_weight) == {"ft-ema": ("l1", 1.0), "ft-mse": ("l2", 0.1)}[name]


def test_overrides_and_yaml_file(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("optim:\n  lr: 1.0e-3\ndata:\n  batch_size: 4\n")
    cfg = load_config(
        str(f), ["optim.lr=3e-4", "model.channel_mult=[1, 2]", "loss.lpips=off", "model.base_channels=16"]
    )
    assert cfg.optim.lr == 3e-4 and cfg.data.batch_size == 4 and cfg.loss.lpips == "off"
    assert cfg.model.autoencoder_config().channel_mult == (1, 2)
    assert parse_override("a.b=true") == {"a": {"b": True}}
    assert parse_override("loss.lpips_weights=null") == {"loss": {"lpips_weights": None}}


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("kl-f8", ["train.seed=3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["seed"] == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], r"^optim\.lrr: unknown key"),
        (["nosection.x=1"], r"^nosection: unknown key"),
        (["optim.lr=fast"], r"^optim\.lr: expected a number"),
        (["train.max_steps=1.5"], r"^train\.max_steps: expected an integer"),
        (["data.hflip=3"], r"^data\.hflip: expected true or false"),
        (["optim.lr=-1"], r"^optim\.lr: must be > 0"),
        (["train.max_steps=0"], r"^train\.max_steps: must be > 0"),
        (["loss.gan_loss=wgan"], r"^loss\.gan_loss: must be one of"),
        (["model.preset=kl-f9"], r"^model\.preset: unknown preset"),
        (["data.resolution=62"], r"^data\.resolution: 62 is not a multiple"),
        (["data.resize=32"], r"^data\.resize: must be >= resolution"),
        (["optim.betas=[0.5]"], r"^optim\.betas: must be two numbers"),
        (["loss.lpips_weights=/nonexistent/vgg.pth"], r"^loss\.lpips_weights: .* is not a file"),
        (["optim=3"], r"^optim: expected a mapping"),
        (["lr"], r"^lr: overrides are written section\.key=value"),
    ],
)
def test_mistakes_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_unknown_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_learning_rate_schedule():
    from training.train import lr_factor

    cosine = dict(warmup=10, total=110, schedule="cosine", min_ratio=0.1)
    assert [lr_factor(s, **cosine) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warm-up
    assert lr_factor(10, **cosine) == pytest.approx(1.0) and lr_factor(60, **cosine) == pytest.approx(0.55)
    assert lr_factor(110, **cosine) == pytest.approx(0.1) and lr_factor(500, **cosine) == pytest.approx(0.1)
    assert lr_factor(60, **{**cosine, "schedule": "constant"}) == 1.0
    with pytest.raises(ConfigError, match="optim.min_lr_ratio"):
        load_config(None, ["optim.min_lr_ratio=2"])
