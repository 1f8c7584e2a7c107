"""The worth of inflation (BENCHMARKS.md section 26): a causal video VAE inflated from a trained image autoencoder
against the same video VAE from scratch, trained alike on the bundled clips; the steps the inflated run needs to
reach the scratch run's final held-out PSNR.

    python benchmarks/inflation_worth.py OUT [--image-model MODEL] [--seeds 0,1] [--steps 1000] [--eval-every 25]

1. The image model: MODEL, or the default run (`kl-ae train`, the `tiny` preset on the bundled photographs, 1200
   steps; `loss.lpips=off`, so the same run online and offline) trained into OUT/image.
2. `kl-ae inflate` it into OUT/inflated. From scratch is the same path with other weights: an untrained image
   model of the image model's own configuration (seeded by the seed, `Autoencoder(config)`, PyTorch's default
   init) inflated into OUT/scratch-init-sS. Both are the same class (`AutoencoderKLCogVideoX`) and architecture;
   both start with zeros on the kernel taps that look back at earlier frames (tail init) and both lose the image
   model's mid-block attention (the class has none), so what differs is only what the image weights know.
3. `kl-ae train` trains both on the bundled clips (held out: carphone, which no run sees) with one recipe: 9-frame
   64 px clips, batch 2, L1 + KL (no LPIPS, no GAN), lr 1e-3 with 100 warm-up steps and a cosine decay, EMA;
   validation of the EMA weights on the held-out clip (its first 9 frames, shorter side 96 px, centre 64 px) every
   `--eval-every` steps (the run's `val.jsonl`); the seed fixes the data order and noise of both runs, so they
   pair. Then `kl-ae eval` on the whole held-out video (113 frames at 64 px) as a check of the final figures.
4. Prints scratch's final held-out PSNR, the first step at which the inflated run reaches it and the step from
   which it stays above it, their ratios to the scratch run's steps, and both curves as a markdown table; writes
   OUT/inflation_worth.json.

Every step is a kl-ae command in its own process, printed as it starts, `--launcher` before it where given (e.g.
`nice -n 10`), with `--threads` torch threads, its output in OUT/logs; `--jobs` trainings run at once. A re-run skips
what is done (a run with its summary.json, a folder with its config.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# one recipe for both runs: phase 1 of the video recipes (no GAN) at CPU size, without LPIPS
RECIPE = ["--data", "sample-video", "data.num_frames=9", "data.resolution=64", "data.resize=96", "data.batch_size=2",
          "loss.lpips=off", "loss.disc_start=100000000", "train.export=false"]  # fmt: skip


def command(args: argparse.Namespace, argv: list[str], log: Path) -> str:
    """Run `argv` (under the launcher, with args.threads threads), its output to `log`; that output, or SystemExit
    with its tail."""
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    print("  $ " + " ".join(argv), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        done = subprocess.run(args.launcher.split() + argv, stdout=f, stderr=subprocess.STDOUT, env=env)
    text = log.read_text()
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(argv)}\n{text[-2000:]}")
    return text


def image_model(args: argparse.Namespace, out: Path) -> str:
    if args.image_model:
        return args.image_model
    run = out / "image"
    if not (run / "summary.json").exists():
        print("training the image model (the default run) ...", flush=True)
        command(args, ["kl-ae", "train", "--out", str(run), "loss.lpips=off"], out / "logs" / "image.log")
    summary = json.loads((run / "summary.json").read_text())
    print(f"image model: {run}, held-out PSNR {summary['last_eval']['val/psnr']:.2f} dB (the two held-out photos)")
    return str(run)


def untrained(image: str, folder: Path, seed: int) -> str:
    """The image model's configuration with fresh weights (PyTorch's default init, seeded), as a diffusers folder."""
    import torch

    from kl_autoencoder import Autoencoder

    if not (folder / "config.json").exists():
        config = Autoencoder.from_pretrained(image).config
        torch.manual_seed(seed)
        Autoencoder(config).save_pretrained(folder)
    return str(folder)


def inflate(args: argparse.Namespace, model: str, out: Path, log: Path) -> float | None:
    """`kl-ae inflate model --out out`; the decoding PSNR of its one-frame check against the image model."""
    if not (out / "config.json").exists():
        command(args, ["kl-ae", "inflate", model, "--out", str(out)], log)
    match = re.search(r"decoding PSNR (\S+) dB", log.read_text())
    return float(match.group(1)) if match else None


def train(args: argparse.Namespace, out: Path, name: str, init: str, seed: int) -> dict[int, float]:
    """One run to args.steps; its held-out PSNR by step (val.jsonl)."""
    run = out / "runs" / name
    if not (run / "summary.json").exists():
        command(args, ["kl-ae", "train", "--out", str(run), f"model.init_from={init}", *RECIPE,
                       f"train.max_steps={args.steps}", f"train.eval_every={args.eval_every}",
                       f"train.sample_every={args.steps}", f"train.checkpoint_every={args.steps}",
                       f"train.seed={seed}"], out / "logs" / f"{name}.log")  # fmt: skip
        print(f"  {name}: done", flush=True)
    rows = [json.loads(line) for line in (run / "val.jsonl").read_text().splitlines()]
    return {r["step"]: r["val/psnr"] for r in rows}


def whole_video(args: argparse.Namespace, out: Path, name: str) -> float:
    """`kl-ae eval` of a finished run on the whole held-out video: its PSNR."""
    run = out / "runs" / name
    if not (run / "eval" / "metrics.json").exists():
        command(args, ["kl-ae", "eval", "--model", str(run), "--data", "sample-video", "--resolution", "64",
                       "--lpips", "off", "--batch-size", "1", "--out", str(run / "eval")],
                out / "logs" / f"{name}-eval.log")  # fmt: skip
    return json.loads((run / "eval" / "metrics.json").read_text())["reconstruction"]["psnr"]


def first_reaching(curve: dict[int, float], target: float) -> int | None:
    return next((step for step in sorted(curve) if curve[step] >= target), None)


def staying_above(curve: dict[int, float], target: float) -> int | None:
    """The first evaluated step from which every later evaluation is >= target (a dip after a first reach counts)."""
    steps = sorted(curve)
    below = [i for i, step in enumerate(steps) if curve[step] < target]
    start = below[-1] + 1 if below else 0
    return steps[start] if start < len(steps) else None


def compare(scratch: dict[int, float], inflated: dict[int, float], steps: int) -> dict:
    """Scratch's final PSNR, where the inflated run first reaches it and from where it stays above it (their
    ratios to `steps`), and the reverse: where scratch first reaches the inflated run's start."""
    target = scratch[steps]
    reach, stay = first_reaching(inflated, target), staying_above(inflated, target)
    return {"scratch_final": target, "inflated_start": inflated[0], "inflated_final": inflated[steps],
            "inflated_reaches_at": reach, "ratio": None if reach is None else reach / steps,
            "inflated_stays_above_from": stay, "ratio_staying": None if stay is None else stay / steps,
            "scratch_reaches_inflated_start_at": first_reaching(scratch, inflated[0])}  # fmt: skip


def report(args: argparse.Namespace, results: dict) -> None:
    def dash(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    print(f"\nvideo VAE (AutoencoderKLCogVideoX, f4 t4), 9-frame 64 px clips, batch 2, L1 + KL, {args.steps} steps; "
          "held-out PSNR of the EMA weights on the first 9 frames of carphone (64 px)\n")  # fmt: skip
    print("| seed | scratch: step 0 -> final | inflated: step 0 -> final | inflated reaches scratch's final at (ratio) "
          "| and stays above from (ratio) | scratch reaches inflated's step 0 at | whole held-out video, final: "
          "scratch / inflated |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for seed, r in results["seeds"].items():
        c = r["compare"]
        print(f"| {seed} | {r['scratch'][0]:.2f} -> {c['scratch_final']:.2f} dB "
              f"| {c['inflated_start']:.2f} -> {c['inflated_final']:.2f} dB "
              f"| {dash(c['inflated_reaches_at'], '{}')} ({dash(c['ratio'])}) "
              f"| {dash(c['inflated_stays_above_from'], '{}')} ({dash(c['ratio_staying'])}) "
              f"| {dash(c['scratch_reaches_inflated_start_at'], '{}')} "
              f"| {r['video_scratch']:.2f} / {r['video_inflated']:.2f} dB |")  # fmt: skip
    for key, what in (("ratio", "first reaches"), ("ratio_staying", "stays above")):
        ratios = [r["compare"][key] for r in results["seeds"].values()]
        if None not in ratios:
            se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else 0.0
            print(f"ratio (steps until the inflated run {what} scratch's final) / {args.steps}: mean "
                  f"{statistics.mean(ratios):.3f} (SE {se:.3f}, {len(ratios)} seeds); target: under 0.5")  # fmt: skip
    seeds = list(results["seeds"])
    print("\n| step | " + " | ".join(f"scratch s{s} | inflated s{s}" for s in seeds) + " |")
    print("|---:|" + "---:|" * (2 * len(seeds)))
    for step in sorted(results["seeds"][seeds[0]]["scratch"]):
        cells = [f"{results['seeds'][s][k][step]:.2f}" for s in seeds for k in ("scratch", "inflated")]
        print(f"| {step} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the folder for the image model, the inflated folders, the runs and the result")
    p.add_argument("--image-model", help="a KL image autoencoder (run, diffusers folder or hub name); default: "
                   "train the default run into OUT/image")  # fmt: skip
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--steps", type=int, default=1000, help="training steps of each run (default 1000)")
    p.add_argument("--eval-every", type=int, default=25, help="steps between held-out validations (default 25)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (default 2)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2), help="torch threads per "
                   "process (default: half the CPUs)")  # fmt: skip
    p.add_argument("--launcher", default="", help="a command every step runs under, e.g. 'nice -n 10'")
    args = p.parse_args()
    if args.steps % args.eval_every:
        sys.exit("--steps must be a multiple of --eval-every")
    out, seeds = Path(args.out), [int(s) for s in args.seeds.split(",")]

    image = image_model(args, out)
    gap = inflate(args, image, out / "inflated", out / "logs" / "inflate.log")
    print(f"inflated: {out / 'inflated'} (one-frame check: decoding PSNR {gap} dB to the image model's)")
    inits = {}
    for seed in seeds:
        folder = untrained(image, out / f"untrained-s{seed}", seed)
        inits[seed] = inflate(args, folder, out / f"scratch-init-s{seed}", out / "logs" / f"inflate-s{seed}.log")

    jobs = [(f"{kind}-s{seed}", str(out / ("inflated" if kind == "inflated" else f"scratch-init-s{seed}")), seed)
            for seed in seeds for kind in ("scratch", "inflated")]  # fmt: skip
    print(f"{len(jobs)} runs of {args.steps} steps, {args.jobs} at once (finished ones reused) ...", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        curves = dict(zip([j[0] for j in jobs], pool.map(lambda j: train(args, out, *j), jobs)))
        videos = dict(zip([j[0] for j in jobs], pool.map(lambda j: whole_video(args, out, j[0]), jobs)))

    results = {"steps": args.steps, "eval_every": args.eval_every, "image_model": image, "inflate_gap_psnr": gap,
               "seeds": {}}  # fmt: skip
    for seed in seeds:
        scratch, inflated = curves[f"scratch-s{seed}"], curves[f"inflated-s{seed}"]
        results["seeds"][seed] = {
            "scratch": scratch, "inflated": inflated, "compare": compare(scratch, inflated, args.steps),
            "video_scratch": videos[f"scratch-s{seed}"], "video_inflated": videos[f"inflated-s{seed}"],
            "scratch_init_gap_psnr": inits[seed],
        }  # fmt: skip
    (out / "inflation_worth.json").write_text(json.dumps(results, indent=1))
    report(args, results)


if __name__ == "__main__":
    main()
