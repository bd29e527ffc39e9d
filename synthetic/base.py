"""The world's base model: the stand-in for SD1.5 that the InstantFamily recipe is trained on.

SD1.5 is a text-to-image model that can draw people but knows nobody; the world base is the same for the
synthetic world. It is the pack's tiny SD1.5-shaped set (:mod:`..demo.tiny`: SD1.5's UNet layout with 16
cross-attention layers and context width 768, the tiny CLIP, a TAESD VAE) with two changes:

- **VAE**: ComfyUI's TAESD with :data:`~..demo.tiny.WORLD_LATENT_CHANNELS` (16) latent channels, trained on
  crops of world scenes (8x down-scaling like SD1.5). With SD1.5's 4 channels a 16 px face at 8x would be
  2 x 2.5 latent pixels of 4 numbers: too few to carry an identity; 16 channels carry it. Its
  ``vae_scale`` / ``vae_shift`` are set so that latents are zero-mean with std ``latent_std`` (1, like
  SD1.5's; latent scale 1).
- **UNet**: trained from scratch (SD1.5's noise schedule; eps-prediction like SD1.5, optionally eps-MSE
  weighted towards high noise: :func:`noise_weighted_eps_mse`, or v-prediction, marked in the checkpoint
  the way ComfyUI marks v models: ``prediction``) on world scenes of 1-7 people
  with their captions through the tiny CLIP (random, frozen: it only has to tell captions apart), caption
  dropout for classifier-free guidance. It learns to draw scenes, bodies and faces, but no particular
  identity: which face appears where is left to chance, exactly the gap InstantFamily fills.

Both are trained with ComfyUI's own classes loaded through ComfyUI's own checkpoint loader, and written as
one SD1.5-layout checkpoint (``checkpoints/instantfamily_world_sd15.safetensors``, fp16) that ComfyUI, the
trainer and the nodes load like any SD1.5 file once :func:`..demo.tiny.register_tiny_model_type` ran.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..train.prediction import check_prediction, eps_and_x0, prediction_of, training_target
from ..train.schedule import WarmupConstantCosine
from .world import FACE_THRESHOLD, World, world_fits

logger = logging.getLogger(__name__)

WORLD_CHECKPOINT = "instantfamily_world_sd15.safetensors"
FORMAT_TAG = "instantfamily-world-base-v1"
# the base spends most steps at full rate, then falls over the last 30 % (one-cycle schedules were slower)
BASE_LR_DECAY = 0.3
BASE_MIXED_PRECISION = ("no", "bf16")


@dataclass
class BaseConfig:
    size: int = 128                 # scene side in pixels (latents are size / 8)
    identities: int = 24
    seed: int = 0
    people: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_crop: int = 32              # the VAE is convolutional: crops train it at a 16th of a scene's cost
    vae_lr: float = 1e-3
    vae_scenes: int = 400           # scenes the crops are cut from
    vae_face_weight: float = 0.0    # extra L1 weight on face pixels (0: plain L1); speeds up faces in short runs
    latent_std: float = 1.0         # std of the encoded latents (vae_scale / vae_shift); see train_vae
    unet_channels: int = 64         # the UNet's model_channels (SD1.5: 320); a multiple of 32 (GroupNorm's groups);
                                    # 64 since 2026-12-07 (32 missed the accuracy targets: README)
    unet_steps: int = 3500
    unet_batch: int = 16
    unet_lr: float = 5e-4
    unet_warmup: int = 100
    unet_scenes: int = 3000         # latent pool the UNet trains on
    text_dropout: float = 0.1
    unet_noise_weight_cap: float = 1.0    # eps-MSE weight 1/SNR (x0 error scale), floored at 1, capped here; 1 = plain
    prediction: str = "v"           # what the UNet predicts: "v" or "eps" (SD1.5's; worse here: README)
    mixed_precision: str = "no"     # "bf16": VAE and UNet training under bf16 autocast (weights stay fp32)
    threads: int = 0                # 0 = torch's default


def _scene_pool(world: World, count: int, cfg: BaseConfig, start: int) -> list:
    # small canvases hold fewer people (the world refuses faces under 8 px)
    people = [n for n in cfg.people if world_fits(n, cfg.size)]
    if not people:
        raise ValueError(f"size {cfg.size}: none of people={cfg.people} fits (faces would be under 8 px)")
    return world.scenes(count, (cfg.size, cfg.size), "train", start=start, people=people)


def _autocast(cfg: BaseConfig):
    """bf16 autocast on the CPU for ``mixed_precision = "bf16"`` (faster on CPUs with native bf16: README),
    else nothing; the loss is always taken in fp32."""
    if cfg.mixed_precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer_step(loss: torch.Tensor, opt, sched, params: list, where: str, lr_key: str) -> None:
    """One clipped AdamW step; a non-finite loss stops the run naming the step (never trains on NaN)."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{where}: loss is {loss.item()}; lower {lr_key}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


# ---------------------------------------------------------------- VAE

def _face_biased_crops(images: np.ndarray, boxes: list[np.ndarray], crop: int, count: int,
                       rng: np.random.Generator) -> np.ndarray:
    """(count, crop, crop, 3) uint8: half the crops cover a face (faces are what must survive the VAE)."""
    n, h, w, _ = images.shape
    out = np.empty((count, crop, crop, 3), np.uint8)
    for i in range(count):
        k = int(rng.integers(n))
        if rng.random() < 0.5 and len(boxes[k]):
            x0, y0, x1, y1 = boxes[k][int(rng.integers(len(boxes[k])))]
            cx = (x0 + x1) / 2 + rng.uniform(-0.4, 0.4) * crop
            cy = (y0 + y1) / 2 + rng.uniform(-0.4, 0.4) * crop
            x, y = int(np.clip(cx - crop / 2, 0, w - crop)), int(np.clip(cy - crop / 2, 0, h - crop))
        else:
            x, y = int(rng.integers(0, w - crop + 1)), int(rng.integers(0, h - crop + 1))
        # crops on the 8-px latent grid, as the VAE sees scenes
        x, y = x // 8 * 8, y // 8 * 8
        out[i] = images[k, y:y + crop, x:x + crop]
    return out


def _vae_l1(y: torch.Tensor, x: torch.Tensor, face_weight: float) -> torch.Tensor:
    """L1 with face pixels (max channel above the world's FACE_THRESHOLD) weighted 1 + face_weight."""
    if face_weight == 0:
        return F.l1_loss(y, x)
    face = (x.amax(1, keepdim=True) > FACE_THRESHOLD / 255.0).float()
    w = 1.0 + face_weight * face
    return ((y - x).abs() * w).sum() / (w.sum() * x.shape[1])


def train_vae(world: World, cfg: BaseConfig, log: Callable[[str], None] = logger.info) -> tuple[torch.nn.Module, dict]:
    """ComfyUI's TAESD (16 latent channels) trained as an autoencoder on world crops; returns it with
    ``vae_scale`` / ``vae_shift`` set for zero-mean latents of std ``cfg.latent_std``, and its held-out
    reconstruction numbers."""
    import comfy.taesd.taesd

    from ..demo.tiny import WORLD_LATENT_CHANNELS, init_weights

    torch.manual_seed(cfg.seed)
    vae = init_weights(comfy.taesd.taesd.TAESD(latent_channels=WORLD_LATENT_CHANNELS), cfg.seed + 3)
    scenes = _scene_pool(world, cfg.vae_scenes, cfg, start=1_000_000)
    images = np.stack([s.image for s in scenes])
    boxes = [s.boxes for s in scenes]
    rng = np.random.default_rng(cfg.seed)
    params = list(vae.taesd_encoder.parameters()) + list(vae.taesd_decoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupConstantCosine(50, cfg.vae_steps, BASE_LR_DECAY))
    vae.train()
    t0 = time.time()
    for step in range(cfg.vae_steps):
        x = torch.from_numpy(_face_biased_crops(images, boxes, cfg.vae_crop, cfg.vae_batch, rng))
        x = x.permute(0, 3, 1, 2).float() / 255.0
        with _autocast(cfg):
            z = vae.taesd_encoder(x)
            y = vae.taesd_decoder(z)
        y, z = y.float(), z.float()
        # L1 keeps the patterns' edges sharper than MSE; the small latent penalty keeps the scale in check
        loss = _vae_l1(y, x, cfg.vae_face_weight) + 1e-4 * z.pow(2).mean()
        _optimizer_step(loss, opt, sched, params, f"world VAE step {step + 1}", "vae_lr")
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"world VAE step {step + 1}/{cfg.vae_steps} L1 {loss.item():.4f} ({time.time() - t0:.0f} s)")
    vae.eval()
    held = _scene_pool(world, 32, cfg, start=2_000_000)
    x = torch.from_numpy(np.stack([s.image for s in held])).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        raw = vae.taesd_encoder(x)
        y = vae.taesd_decoder(raw).clamp(0, 1)
        mean, std = float(raw.mean()), float(raw.std())
        # ComfyUI: encode = raw / vae_scale + vae_shift, decode(z) = decoder((z - vae_shift) * vae_scale)
        # latent_std > 1 shifts every noise level's SNR by latent_std**2 (Hoogeboom et al. 2023: SD1.5's
        # schedule was made for 64x64 latents, these are 16x16). Measured at 3 (README): the base's
        # high-noise predictions improved, but its samples stayed texture and identity accuracy fell.
        vae.vae_scale.fill_(std / cfg.latent_std)
        vae.vae_shift.fill_(-mean * cfg.latent_std / std)
    mse = float((y - x).pow(2).mean())
    # reference: every held-out picture replaced by its own mean colour (what a useless VAE reaches)
    flat_mse = float((x.mean((2, 3), keepdim=True) - x).pow(2).mean())
    face_mse = float(np.mean([((y[i, :, y0:y1, x0:x1] - x[i, :, y0:y1, x0:x1]) ** 2).mean().item()
                              for i, s in enumerate(held) for x0, y0, x1, y1 in s.boxes.astype(int)]))
    stats = {"psnr": round(-10 * math.log10(max(mse, 1e-10)), 2),
             "face_psnr": round(-10 * math.log10(max(face_mse, 1e-10)), 2),
             "flat_psnr": round(-10 * math.log10(max(flat_mse, 1e-10)), 2),
             "raw_mean": mean, "raw_std": std, "seconds": round(time.time() - t0, 1)}
    log(f"world VAE held-out PSNR {stats['psnr']} dB (faces {stats['face_psnr']} dB)")
    return vae, stats


# ---------------------------------------------------------------- UNet

def _check_config(cfg: BaseConfig) -> None:
    check_prediction(cfg.prediction)     # before minutes of VAE training, not after
    if cfg.unet_channels < 32 or cfg.unet_channels % 32:
        raise ValueError(f"unet_channels = {cfg.unet_channels}: must be a positive multiple of 32 (the UNet's "
                         "GroupNorm has 32 groups); try 32, 64 or 96")
    if cfg.mixed_precision not in BASE_MIXED_PRECISION:
        raise ValueError(f"mixed_precision = {cfg.mixed_precision!r}: must be one of {BASE_MIXED_PRECISION}")
    if cfg.prediction == "v" and cfg.unet_noise_weight_cap > 1:
        raise ValueError("unet_noise_weight_cap: weights the eps-MSE only (v-MSE already weighs high noise); "
                         "leave it at 1 with prediction 'v'")


def _alphas_cumprod(model) -> torch.Tensor:
    sigmas = model.get_model_object("model_sampling").sigmas.detach().to(torch.float64).cpu()
    return (1.0 / (1.0 + sigmas ** 2)).to(torch.float32)


def _encode_captions(clip, captions: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for c in sorted(set(captions)):
            out[c] = clip.encode_from_tokens(clip.tokenize(c)).float().cpu()[0]
    return out


def encode_scenes(vae, images: np.ndarray, batch: int = 32) -> torch.Tensor:
    """(B, 16, H/8, W/8) latents of uint8 (B, H, W, 3) scenes through ComfyUI's VAE wrapper (what the
    trainer's latent cache and VAE Encode give)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            px = torch.from_numpy(images[i:i + batch]).float() / 255.0
            out.append(vae.encode(px).float().cpu())
    return torch.cat(out)


def noise_weighted_eps_mse(eps: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor,
                           cap: float) -> torch.Tensor:
    """Weighted mean over the batch of per-sample eps-MSE, weight ``clamp(1/SNR, 1, cap)`` with
    ``SNR = alpha_bar / (1 - alpha_bar)``; ``cap <= 1`` is the plain eps-MSE.

    Plain eps-MSE barely weighs high noise (there eps ~ z_t whatever the scene), yet the first sampling
    steps turn eps error into x0 error times 1/SNR: a small base trained that way draws texture. The weight
    is x0's error scale, floored so that low noise keeps the plain weight."""
    w = ((1 - alpha_bar) / alpha_bar).clamp(1.0, max(1.0, float(cap)))
    per_sample = (eps.float() - noise.float()).pow(2).flatten(1).mean(1)
    return (w * per_sample).sum() / w.sum()


def train_unet(model, clip, vae, world: World, cfg: BaseConfig,
               log: Callable[[str], None] = logger.info) -> dict:
    """Training of ``model``'s UNet in place on world scene latents, on the target of the model type
    ComfyUI loaded (eps or v); returns the loss log."""
    unet = model.model.diffusion_model
    latent_format = model.model.latent_format
    scenes = _scene_pool(world, cfg.unet_scenes, cfg, start=0)
    t0 = time.time()
    z0_all = latent_format.process_in(encode_scenes(vae, np.stack([s.image for s in scenes])))
    captions = [s.caption for s in scenes]
    text = _encode_captions(clip, captions + [""])
    ctx_all = torch.stack([text[c] for c in captions])
    empty = text[""]
    log(f"world UNet: {len(scenes)} scenes encoded in {time.time() - t0:.0f} s, latents {tuple(z0_all.shape[1:])}, "
        f"std {float(z0_all.std()):.3f}")
    ac = _alphas_cumprod(model)
    prediction = prediction_of(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    unet.train().requires_grad_(True)
    params = [p for p in unet.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)

    schedule = WarmupConstantCosine(cfg.unet_warmup, cfg.unet_steps, BASE_LR_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses, t0 = [], time.time()
    for step in range(cfg.unet_steps):
        idx = torch.randint(0, len(z0_all), (cfg.unet_batch,), generator=gen)
        z0 = z0_all[idx]
        ctx = ctx_all[idx].clone()
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.text_dropout
        ctx[drop] = empty
        t = torch.randint(0, len(ac), (cfg.unet_batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with _autocast(cfg):
            out = unet(z_t, timesteps=t.float(), context=ctx).float()
        loss = noise_weighted_eps_mse(out, training_target(prediction, z0, noise, a), a.view(-1),
                                      cfg.unet_noise_weight_cap)
        _optimizer_step(loss, opt, sched, params, f"world UNet step {step + 1}", "unet_lr")
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            recent = float(np.mean(losses[-100:]))
            log(f"world UNet step {step + 1}/{cfg.unet_steps} loss {recent:.4f} ({time.time() - t0:.0f} s)")
    unet.eval().requires_grad_(False)
    return {"loss_first100": float(np.mean(losses[:100])), "loss_last100": float(np.mean(losses[-100:])),
            "seconds": round(time.time() - t0, 1), "losses": [round(v, 5) for v in losses]}


PROBE_TIMESTEPS = (50, 200, 500, 800, 950)


@torch.no_grad()
def x0_error_by_noise(model, clip, vae, scenes: list, timesteps: tuple[int, ...] = PROBE_TIMESTEPS,
                      seed: int = 0) -> dict[str, float]:
    """For each timestep t: the UNet's x0 error on ``scenes`` noised to t (x0 from its output: eps or v),
    as a fraction of what predicting each latent channel's mean over the scenes would score. Above 1 at high
    t, the first sampling steps commit to a worse layout than no layout at all (samples become texture)."""
    unet = model.model.diffusion_model
    lf = model.model.latent_format
    z0 = lf.process_in(encode_scenes(vae, np.stack([s.image for s in scenes])))
    text = _encode_captions(clip, [s.caption for s in scenes])
    ctx = torch.stack([text[s.caption] for s in scenes])
    ac = _alphas_cumprod(model)
    prediction = prediction_of(model)
    mean_err = float((z0 - z0.mean((0, 2, 3), keepdim=True)).pow(2).mean())
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for t in timesteps:
        noise = torch.randn(z0.shape, generator=gen)
        a = ac[t]
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        out_t = unet(z_t, timesteps=torch.full((len(z0),), float(t)), context=ctx)
        _, x0 = eps_and_x0(prediction, out_t, z_t, a)
        out[str(t)] = round(float((x0 - z0).pow(2).mean()) / mean_err, 4)
    return out


@torch.no_grad()
def sample_base(model, clip, vae, captions: list[str], size: int, steps: int = 20, cfg_scale: float = 4.0,
                seed: int = 0) -> np.ndarray:
    """(B, H, W, 3) uint8 pictures from the base alone (deterministic DDIM, classifier-free guidance)."""
    unet = model.model.diffusion_model
    lf = model.model.latent_format
    ac = _alphas_cumprod(model)
    prediction = prediction_of(model)
    text = _encode_captions(clip, captions + [""])
    cond = torch.stack([text[c] for c in captions])
    uncond = text[""].expand_as(cond)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((len(captions), lf.latent_channels, size // 8, size // 8), generator=gen)
    ts = torch.linspace(len(ac) - 1, 0, steps).round().long()
    for i, t in enumerate(ts):
        out = unet(torch.cat([x, x]), timesteps=t.float().repeat(2 * len(x)), context=torch.cat([cond, uncond]))
        o_c, o_u = out.chunk(2)
        a = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        e, x0 = eps_and_x0(prediction, o_u + cfg_scale * (o_c - o_u), x, a)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    img = vae.decode(lf.process_out(x)).clamp(0, 1)     # ComfyUI's VAE: (B, H, W, 3)
    return (img.float().cpu().numpy() * 255).round().astype(np.uint8)


# ---------------------------------------------------------------- the checkpoint

def _checkpoint_dict(unet_sd: dict, clip_sd: dict, vae_sd: dict, prediction: str) -> dict[str, torch.Tensor]:
    sd = {f"model.diffusion_model.{k}": v for k, v in unet_sd.items()}
    if prediction == "v":
        sd["v_pred"] = torch.tensor([])    # ComfyUI's mark of a v-prediction checkpoint
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_sd.items()})
    sd.update({f"first_stage_model.{k}": v for k, v in vae_sd.items()})
    return sd


def _save(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)   # atomic: a reader never sees half a file


def world_unet(channels: int, seed: int) -> torch.nn.Module:
    """The world base's UNet, untrained: the tiny SD1.5-shaped UNet on 16-channel world latents with
    ``channels`` as its model_channels, weights seeded by ``seed`` (needs ComfyUI importable)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from ..demo.tiny import UNET_CONFIG, UNET_EXTRA, WORLD_LATENT_CHANNELS, init_weights

    unet_cfg = dict(UNET_CONFIG, in_channels=WORLD_LATENT_CHANNELS, out_channels=WORLD_LATENT_CHANNELS,
                    model_channels=channels)
    return init_weights(UNetModel(**unet_cfg, **UNET_EXTRA, operations=comfy.ops.disable_weight_init,
                                  device="cpu", dtype=torch.float32), seed)


def build_world_base(root: str | os.PathLike, cfg: BaseConfig | None = None,
                     log: Callable[[str], None] = logger.info) -> Path:
    """Train the VAE, then the UNet, and write ``<root>/checkpoints/instantfamily_world_sd15.safetensors``
    (with ``world_base.json``: config and measurements, and ``world_base_samples.png``). Returns its path.
    Needs ComfyUI importable (``train.host.import_comfy``)."""
    import comfy.sd

    from ..demo.tiny import WORLD_LATENT_CHANNELS, clip_state_dict, register_tiny_model_type

    cfg = cfg or BaseConfig()
    _check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    register_tiny_model_type()
    root = Path(root).resolve()
    path = root / "checkpoints" / WORLD_CHECKPOINT
    world = World(cfg.identities, cfg.seed)
    t_start = time.time()
    vae_module, vae_stats = train_vae(world, cfg, log)

    unet0 = world_unet(cfg.unet_channels, cfg.seed)
    clip_sd = clip_state_dict(cfg.seed + 2)
    # Through ComfyUI's own loader: the latents and caption encodings the UNet trains on are exactly
    # what the trainer and the nodes will compute from the written file.
    start = _checkpoint_dict(unet0.state_dict(), clip_sd, vae_module.state_dict(), cfg.prediction)
    del unet0
    staging = root / "checkpoints" / (WORLD_CHECKPOINT + ".staging.safetensors")
    _save(start, staging, {"instantfamily_tiny": FORMAT_TAG, "what": "world base (untrained UNet)"})
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(staging), output_vae=True, output_clip=True, model_options={"dtype": torch.float32})
    staging.unlink()
    if model.model.latent_format.latent_channels != WORLD_LATENT_CHANNELS:
        raise RuntimeError("world base: ComfyUI did not pick the world model type; register_tiny_model_type failed")
    loaded = prediction_of(model)
    if loaded != cfg.prediction:
        raise RuntimeError(f"world base: ComfyUI loaded a {loaded} model, asked {cfg.prediction}")
    unet_stats = train_unet(model, clip, vae, world, cfg, log)

    samples = sample_base(model, clip, vae, [s.caption for s in _scene_pool(world, 8, cfg, start=3_000_000)],
                          cfg.size, seed=cfg.seed)
    probe = x0_error_by_noise(model, clip, vae, _scene_pool(world, 32, cfg, start=2_000_000), seed=cfg.seed)
    log(f"world UNet x0 error vs the latent mean, by timestep: {probe}")
    meta = {"config": asdict(cfg), "vae": vae_stats,
            "unet": {**{k: v for k, v in unet_stats.items() if k != "losses"}, "x0_error_vs_mean": probe},
            "seconds": round(time.time() - t_start, 1)}
    unet_sd = model.model.diffusion_model.state_dict()
    _save(_checkpoint_dict(unet_sd, clip_sd, vae_module.state_dict(), cfg.prediction), path,
          {"instantfamily_tiny": FORMAT_TAG, "what": "synthetic world base", "world_base": json.dumps(meta)})
    (root / "world_base.json").write_text(json.dumps({**meta, "unet_losses": unet_stats["losses"]}) + "\n")
    _write_samples(samples, unet_stats["losses"], root / "world_base_samples.png")
    log(f"world base written: {path} ({meta['seconds']:.0f} s)")
    return path


def _write_samples(samples: np.ndarray, losses: list[float], path: Path) -> None:
    """Base samples in a row above the UNet's loss curve (smoothed), one PNG."""
    import cv2

    row = np.concatenate(list(samples), axis=1)
    h, w = 120, row.shape[1]
    plot = np.full((h, w, 3), 255, np.uint8)
    if len(losses) > 1:
        k = max(1, len(losses) // 50)
        sm = np.convolve(losses, np.ones(k) / k, mode="valid")
        lo, hi = float(sm.min()), float(sm.max())
        xs = np.linspace(10, w - 10, len(sm))
        ys = 10 + (hi - sm) / max(hi - lo, 1e-8) * (h - 30)
        pts = np.stack([xs, ys], 1).round().astype(np.int32)
        cv2.polylines(plot, [pts], False, (40, 90, 200), 1, cv2.LINE_AA)
        cv2.putText(plot, f"UNet loss {sm[0]:.3f} -> {sm[-1]:.3f} over {len(losses)} steps", (10, h - 6),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate([row, plot]), cv2.COLOR_RGB2BGR))
