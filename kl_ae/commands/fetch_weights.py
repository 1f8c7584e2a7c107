"""`kl-ae fetch-weights`: download and hash-check every pretrained file a recipe and `kl-ae eval` need.

For clusters whose compute nodes are offline: run it where there is internet, with the `$TORCH_HOME` the
nodes share, then train there with `KL_AE_OFFLINE=1` (or `HF_HUB_OFFLINE=1`). Files already in the cache
are checked against their hash too; `KL_AE_WEIGHTS_MIRROR` downloads from a mirror instead.
"""

from __future__ import annotations

import importlib.util

from kl_ae.common.config import ConfigError
from kl_ae.common.weights import KNOWN, fetch, verify
from training.config import load_config


def needed(config: str | None, what: str) -> list[str]:
    """The registry keys (`kl_ae.common.weights.KNOWN`) that `--what` asks for, given the recipe `--config`."""
    names: list[str] = []
    for item in (w.strip() for w in what.split(",") if w.strip()):
        if item == "lpips":  # the recipe's backbone; `kl-ae eval` uses vgg
            cfg = load_config(config) if config else None
            if cfg is not None and (cfg.loss.lpips == "off" or cfg.loss.perceptual_weight == 0):
                print(f"{config}: trains without LPIPS (loss.lpips off or perceptual_weight 0); nothing to fetch")
                continue
            names.append(f"lpips-{cfg.loss.lpips_net}" if cfg is not None else "lpips-vgg")
        elif item == "fid":
            names.append("fid-inception")
        elif item == "fvd":  # rFVD of clips in `kl-ae eval`
            names.append("fvd-i3d")
        elif item in KNOWN:
            names.append(item)
        else:
            raise ConfigError(f"--what: unknown item {item!r}; choose from lpips, fid, fvd, {', '.join(sorted(KNOWN))}")
    return list(dict.fromkeys(names))


def fetch_weights(config: str | None = None, what: str = "lpips,fid") -> bool:
    """Fetch and verify each file; prints one line per file; True when all are in the cache with the right hash."""
    ok = True
    for name in needed(config, what):
        path, why = fetch(name)
        if path is None:
            print(f"{KNOWN[name].file}: {why}")
            ok = False
            continue
        good, line = verify(name)
        print(line)
        ok = ok and good
        if name == "fid-inception" and importlib.util.find_spec("torch_fidelity") is None:
            print("  note: rFID also needs torch-fidelity (pip install torch-fidelity)")
        if name == "fvd-i3d" and importlib.util.find_spec("cdfvd") is None:
            print("  note: rFVD also needs cd-fvd (pip install cd-fvd)")
    return ok
