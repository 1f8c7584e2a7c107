"""The worth of temporal compression (BENCHMARKS.md section 25): a tiny causal t4 video VAE against the same
architecture without temporal downsampling taken frame by frame (`model.per_frame`), at equal latent numbers per
clip, on the same data, steps and losses; held-out PSNR paired by seed.

    python benchmarks/temporal_worth.py --out runs/temporal --steps 4000 --seeds 0,1,2 --channels 3

- Both sides are the `tiny-video` recipe's phase 1 (L1 + KL, no GAN; LPIPS off, so that both train without it
  whether or not its weights are installed), Wan format, f4, 9-frame clips with a fifth of the batches images, at
  `--resolution` px crops of frames resized to `--resize`. The video VAE (`temperal_downsample: [true, true]`)
  gives 3 latent frames of `--channels` channels per clip; the per-frame baseline (`[false, false]`, each frame a
  one-frame clip) 9 latent frames of a third as many: the same number of latent values per clip. The default, 3
  channels, is Wan 2.1's compression (48 pixel values per latent value; 12 channels: 12).
- Held out: every 9-frame window of the bundled clip that no run trains on (`carphone_pristine.mp4`: 13 windows,
  written to OUT/heldout as H.264 clips, the reference both sides are scored against), through `kl-ae eval` at
  `--resize` px (the scale the runs train at). A causal model encodes the first frame of a clip alone, so the first
  frame and the other eight are reported apart.
- Every training and evaluation is the `kl-ae` command a user would run, printed as it starts; finished runs and
  evaluations are reused (a run in progress is waited for), so calls for some seeds or one kind (`--kinds`), in
  parallel, fill the same folder and a last call with every seed prints the whole table (OUT/results.json holds
  it).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

FRAMES = 9
T = 4  # the video VAE's temporal factor
KINDS = ("video", "per-frame")


def latent_frames(kind: str) -> int:
    return 1 + (FRAMES - 1) // T if kind == "video" else FRAMES


def model_overrides(kind: str, channels: int) -> list[str]:
    """`tiny-video`'s architecture (16-channel first level, f4), its latent channels set so that both kinds hold the
    same number of latent values per clip."""
    c = channels * latent_frames("video") // latent_frames(kind)
    if kind == "video":
        return [f"model.arch.z_dim={c}", "model.arch.temperal_downsample=[true,true]"]
    return [f"model.arch.z_dim={c}", "model.arch.temperal_downsample=[false,false]", "model.per_frame=true"]


def run(cmd: list[str], log: Path) -> float:
    """Run a `kl-ae` command, its output to `log`; its wall time in seconds. On failure: exit, with the tail."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}\n" + log.read_text()[-3000:])
    return time.perf_counter() - start


def held_out_windows(out: Path) -> Path:
    """Every FRAMES-frame window of the held-out bundled clip, each written as a clip of its own."""
    from kl_ae.common.video import SAMPLE_VIDEO_VAL, frame_index, read_clip, sample_video_dir, write_video

    folder = out / "heldout"
    if folder.is_dir():
        return folder
    tmp = out / f"heldout.{os.getpid()}"  # written whole, then renamed: calls in parallel see all or nothing
    tmp.mkdir()
    for name in SAMPLE_VIDEO_VAL:
        path = sample_video_dir() / name
        for w in range(len(frame_index(str(path)).pts) // FRAMES):
            clip = read_clip(str(path), w * FRAMES, FRAMES)  # uint8 (3, T, H, W)
            write_video(tmp / f"{Path(name).stem}_{w:02d}.mp4", clip, fps=30)
    try:
        tmp.rename(folder)
    except OSError:  # another call wrote it first
        shutil.rmtree(tmp)
    return folder


def train_and_eval(kind: str, seed: int, args, heldout: Path) -> dict:
    """One run and its held-out evaluation (each skipped when already done): PSNR of all frames, the first, the
    rest, and the training wall time. A call in parallel that wants the same run waits for it (a lock file)."""
    with (args.out / f"{kind}_s{seed}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _train_and_eval(kind, seed, args, heldout)


def _train_and_eval(kind: str, seed: int, args, heldout: Path) -> dict:
    folder = args.out / f"{kind}_s{seed}"
    metrics = folder / "heldout" / "metrics.json"
    timing = folder / "train_seconds.txt"
    if not (folder / "diffusers" / "config.json").is_file():
        cmd = ["kl-ae", "train", "--config", "tiny-video", "--out", str(folder), "--max-steps", str(args.steps),
               *model_overrides(kind, args.channels), f"train.seed={seed}", f"data.resolution={args.resolution}",
               f"data.resize={args.resize}", "data.num_workers=0", "loss.lpips=off", f"optim.lr={args.lr}",
               f"train.eval_every={args.steps}", f"train.sample_every={args.steps}",
               f"train.checkpoint_every={args.steps}"]  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        timing.write_text(f"{run(cmd, args.out / f'{kind}_s{seed}.train.log'):.1f}\n")
    if not metrics.is_file():
        cmd = ["kl-ae", "eval", "--model", str(folder), "--data", str(heldout), "--frames", str(FRAMES),
               "--resolution", str(args.resize), "--lpips", "off", "--out", str(metrics.parent)]  # fmt: skip
        run(cmd, args.out / f"{kind}_s{seed}.eval.log")
    rec = json.loads(metrics.read_text())["reconstruction"]
    seconds = float(timing.read_text()) if timing.is_file() else math.nan
    return {"all": rec["psnr"], "first": rec["psnr_first_frame"], "rest": rec["psnr_rest"], "train_s": seconds}


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (nan for one value)."""
    m = statistics.fmean(values)
    return m, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def table(results: dict[int, dict[str, dict]]) -> str:
    """Per seed: both kinds and their difference (video - per frame); then the means and the paired difference's
    mean with its standard error."""
    parts = ("all", "first", "rest")
    head = ["seed", *(f"video t4: {p}" for p in parts), *(f"per frame: {p}" for p in parts),
            *(f"video - per frame: {p}" for p in parts)]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    seeds = sorted(results)
    for s in seeds:
        v, f = results[s]["video"], results[s]["per-frame"]
        cells = [f"{v[p]:.2f}" for p in parts] + [f"{f[p]:.2f}" for p in parts]
        cells += [f"{v[p] - f[p]:+.2f}" for p in parts]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    cells = []
    for kind in KINDS:
        cells += [f"{statistics.fmean(results[s][kind][p] for s in seeds):.2f}" for p in parts]
    for p in parts:
        m, se = mean_se([results[s]["video"][p] - results[s]["per-frame"][p] for s in seeds])
        cells.append(f"**{m:+.2f}** ({se:.2f})")
    lines.append("| mean (SE of the paired difference) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/temporal"))
    p.add_argument("--steps", type=int, default=4000, help="training steps of every run")
    p.add_argument("--resolution", type=int, default=32, help="training crops, px")
    p.add_argument("--resize", type=int, default=48, help="frames' shorter side before cropping; also the eval size")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values")
    p.add_argument("--channels", type=int, default=3, help="the video VAE's latent channels (a multiple of 3)")
    p.add_argument("--lr", type=float, default=1e-3, help="optim.lr of every run")
    p.add_argument("--kinds", default=",".join(KINDS), help="train and evaluate only these (the table needs both)")
    args = p.parse_args()
    if args.channels % 3:
        p.error("--channels: a multiple of 3, so that the per-frame baseline has a third as many")
    args.out.mkdir(parents=True, exist_ok=True)
    heldout = held_out_windows(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    kinds = args.kinds.split(",")
    if set(kinds) - set(KINDS):
        p.error(f"--kinds: {sorted(set(kinds) - set(KINDS))}; choose from {', '.join(KINDS)}")
    results = {s: {kind: train_and_eval(kind, s, args, heldout) for kind in kinds} for s in seeds}
    if set(kinds) != set(KINDS):
        print(json.dumps(results, indent=2))
        return
    h = args.resolution // 4  # tiny-video is f4
    sizes = {k: f"{latent_frames(k)} x {args.channels * 3 // latent_frames(k)} x {h} x {h}" for k in KINDS}
    print(f"\n{args.steps} steps, {args.resolution} px crops of frames resized to {args.resize}; latents of a training "
          f"clip (t x c x h x w): video {sizes['video']}, per frame {sizes['per-frame']}; held-out: "
          f"{len(list(heldout.glob('*.mp4')))} windows of {FRAMES} frames at {args.resize} px\n")  # fmt: skip
    print(table(results))
    times = {k: statistics.fmean(results[s][k]["train_s"] for s in seeds) for k in KINDS}
    print(f"\nmean training wall time: video {times['video']:.0f} s, per frame {times['per-frame']:.0f} s")
    file = args.out / "results.json"
    saved = json.loads(file.read_text()) if file.is_file() else {}
    saved.update({str(s): r for s, r in results.items()})
    file.write_text(json.dumps(saved, indent=2) + "\n")


if __name__ == "__main__":
    main()
