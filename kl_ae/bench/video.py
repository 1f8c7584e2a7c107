"""The video sections of `kl-ae bench`.

- `video-memory`: peak memory of encoding and decoding 17, 33 and 121 frames through each video family, whole
  against chunked (`ae.tiling(True)`: the class's causal chunks / framewise passes and spatial tiles). Each
  measurement runs in a fresh process (a CPU process's peak RSS only grows), as the rise of peak RSS over the
  process's state after the model and the clip exist; on CUDA, torch's peak allocation.
- `video-data`: clips per second the data pipeline decodes (PyAV, `ClipDataset` over the bundled clips) with 0
  and 2 DataLoader workers, against the clips per second a decoder-only training step of a Wan VAE consumes at
  the same size: the loader must never starve the step.
"""

from __future__ import annotations

import tempfile
import time

import torch

from kl_ae.bench.common import BenchConfig, in_child, interleaved_times
from kl_ae.bench.device import peak_memory_mib, reset_peak_memory, sync

VIDEO_FAMILIES = ("wan-video", "hunyuan-video", "ltx-video", "cogvideox")
CLIP_FRAMES = 17  # the families section's clips: 1 + 4k and 1 + 8k
MEMORY_FRAMES = (17, 33, 121)


def video_config(name: str, width: int) -> tuple[str, dict]:
    """(diffusers class name, config) of a video family's released architecture at a reduced width (its first level
    `width` channels where the release has 96-128), with its released factors and latent channels."""
    w = width
    if name == "wan-video":  # Wan 2.1: f8 t4, 16 channels
        return "AutoencoderKLWan", dict(base_dim=w, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                        temperal_downsample=[False, True, True])  # fmt: skip
    if name == "hunyuan-video":  # f8 t4, 16 channels
        return "AutoencoderKLHunyuanVideo", dict(block_out_channels=(w, 2 * w, 4 * w, 4 * w), norm_num_groups=8,
                                                 latent_channels=16, layers_per_block=2)  # fmt: skip
    if name == "ltx-video":  # f32 t8, 128 channels
        return "AutoencoderKLLTXVideo", dict(block_out_channels=(w, 2 * w, 4 * w, 4 * w),
                                             decoder_block_out_channels=(w, 2 * w, 4 * w, 4 * w), latent_channels=128,
                                             layers_per_block=(2, 2, 2, 2, 2),
                                             decoder_layers_per_block=(2, 2, 2, 2, 2))  # fmt: skip
    if name == "cogvideox":  # f8 t4, 16 channels
        return "AutoencoderKLCogVideoX", dict(block_out_channels=(w, 2 * w, 2 * w, 4 * w), norm_num_groups=8,
                                              latent_channels=16, layers_per_block=2)  # fmt: skip
    raise ValueError(f"unknown video family {name!r}; choose from {VIDEO_FAMILIES}")


def build_video_family(name: str, width: int, folder: str):
    """A random init of `name`'s architecture, saved by diffusers and loaded through kl-ae (its adapter)."""
    import diffusers

    from kl_autoencoder.interface import load_autoencoder

    class_name, config = video_config(name, width)
    torch.manual_seed(0)
    getattr(diffusers, class_name)(**config).save_pretrained(folder)
    return load_autoencoder(folder)


def _memory_child(name: str, width: int, frames: int, size: int, chunked: bool, device: str, queue) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as folder:
        ae = build_video_family(name, width, folder).to(device)
        ae.tiling(chunked)
        x = torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
        reset_peak_memory(device)
        before = peak_memory_mib(device)
        start = time.perf_counter()
        with torch.no_grad():
            y = ae.decode(ae.encode(x).mode())
        sync()
        seconds = time.perf_counter() - start
        queue.put({"peak_rise_mib": peak_memory_mib(device) - before, "seconds": seconds,
                   "out_frames": int(y.shape[2])})  # fmt: skip


def bench_video_memory(cfg: BenchConfig) -> dict:
    """{family: {whole|chunked: {frames: figures}}}, each figure from a process of its own."""
    out: dict = {"resolution": cfg.resolution, "width": cfg.family_width, "frames": list(MEMORY_FRAMES)}
    for name in cfg.video_families:
        out[name] = {}
        for mode in ("whole", "chunked"):
            out[name][mode] = {}
            for frames in MEMORY_FRAMES:
                args = (name, cfg.family_width, frames, cfg.resolution, mode == "chunked", cfg.device)
                out[name][mode][frames] = in_child(_memory_child, *args)
    return out


def bench_video_data(cfg: BenchConfig) -> dict:
    """Clips per second from the data pipeline (0 and 2 workers) against a decoder-only Wan step's consumption."""
    from torch.utils.data import DataLoader

    from kl_ae.common.config import DataConfig
    from kl_ae.common.data import build_datasets

    frames, batch = 9, cfg.batch_size
    # two training videos: each visited many times, a fresh clip (start, crop, flip) per visit
    data = DataConfig(source="sample-video", num_frames=frames, resolution=cfg.resolution, batch_size=batch,
                      repeats=(cfg.steps + 2) * batch)  # fmt: skip
    train, _ = build_datasets(data, cfg.seed)
    out: dict = {"clip": f"{frames} frames at {cfg.resolution} px", "batch_size": batch, "loader": {}}
    for workers in (0, 2):
        loader = DataLoader(train, batch_size=batch, num_workers=workers, persistent_workers=workers > 0)
        it = iter(loader)
        next(it)  # workers started, files indexed
        start, n = time.perf_counter(), 0
        for _ in range(cfg.steps):
            n += len(next(it))
        out["loader"][f"workers_{workers}"] = n / (time.perf_counter() - start)
    out["step"] = _step_demand(cfg, frames, batch)
    out["loader_over_step"] = {k: v / out["step"]["clips_per_s"] for k, v in out["loader"].items()}
    return out


def _step_demand(cfg: BenchConfig, frames: int, batch: int) -> dict:
    """Clips per second of a decoder-only L1 + LPIPS (random AlexNet) step of the bench's Wan VAE, fp32."""
    from kl_ae.common.frames import per_frame
    from kl_ae.common.lpips import LPIPS

    with tempfile.TemporaryDirectory() as folder:
        ae = build_video_family("wan-video", cfg.family_width, folder)
    ae.module.train()
    ae.freeze(["decoder"])
    lpips = LPIPS("alex", random_backbone=True)
    params = [p for p in ae.module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.rand(batch, 3, frames, cfg.resolution, cfg.resolution) * 2 - 1

    def step():
        recon = ae.decode(ae.encode(x).sample())
        loss = (recon - x).abs().mean() + per_frame(lpips, x, recon).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = min(interleaved_times({"step": step}, max(1, cfg.steps // 4), cfg.repeats)["step"])
    return {"seconds": seconds, "clips_per_s": batch / seconds}
