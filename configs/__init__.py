"""Named training recipes, one YAML per preset, shipped with the package so `--config NAME` works anywhere."""
