"""Named training recipes, one YAML per preset, installed as `kl_ae.configs` so `--config NAME` works anywhere."""
