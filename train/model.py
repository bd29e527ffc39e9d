"""The model a training step runs: frozen SD1.5 (ComfyUI's model code as a library) + the trained
ID projection and ControlNet, with the pack's masked cross-attention in every UNet and ControlNet
cross-attention layer (installed through ``attention.layer``'s one seam, as the nodes do).

What one step does (:meth:`TrainModel.loss`, eq. 3):

1. z0: the VAE latent of the image (or the shards' cached latent), scaled as ComfyUI's SD1.5 latent
   format does; text: CLIP of the caption (or the cached embedding); both without gradient.
2. Classifier-free dropout: a dropped caption becomes the empty prompt's embedding; dropped IDs become
   the null identity (the projection of all-zero features, exactly what the nodes' Embedding Stack
   gives the negative prompt) with the same masks and strengths, so training sees the uncond branch
   ComfyUI runs at inference. Empty slots get zero features, an empty mask and strength 0 (no
   attention at all, the same as a stack with fewer IDs).
3. K = [text ; ID tokens] (eq. 4-5), an ``IdentityBinding`` with the batch's per-sample masks.
4. t ~ U{0..999}, eps ~ N(0, I) from the caller's generator only; z_t = sqrt(a_t) z0 + sqrt(1-a_t) eps
   with SD1.5's DDPM schedule (ComfyUI's model_sampling sigmas: a_t = 1 / (1 + sigma_t^2)).
5. ControlNet(z_t, control image, t, K) inside ``binding_scope`` (cldm does not pass options down),
   its outputs in the dict layout ComfyUI's UNet consumes; UNet(z_t, t, K, control) with the binding
   in transformer_options; loss = mean squared error between the prediction and its target: the noise
   for SD1.5 (eps-prediction), v = sqrt(a_t) eps - sqrt(1-a_t) z0 for a v-prediction checkpoint
   (ComfyUI's model type, :mod:`.prediction`).

Gradients reach the projection through the (frozen) masked cross-attention of both networks, and the
ControlNet directly. The ControlNet starts from the UNet (ControlNet paper: encoder copied, zero
convolutions and the hint encoder's last conv at zero) or from an SD1.5 ControlNet file.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..attention.layer import OPTIONS_KEY, IdentityBinding, binding_scope, install_layers, wrap_cross_attention
from ..attention.masks import IDMasks
from ..models.projection import IDProjection, ProjectionConfig, stack_context
from ..models.weights import WeightMeta
from .batch import Batch
from .loss import foreground, weighted_mse
from .prediction import eps_and_x0, prediction_of, training_target
from .shards import Manifest

N_TRAIN_TIMESTEPS = 1000


class ModelSetupError(ValueError):
    """A checkpoint, ControlNet or data set the trainer cannot use; the message says what to do."""


# ---------------------------------------------------------------- loading (ComfyUI's code as a library)

def _require_safetensors(path: str, what: str) -> Path:
    p = Path(path)
    if not path or not p.is_file():
        raise ModelSetupError(f"{what}: {path!r} is not a file; set it in the training config")
    if p.suffix != ".safetensors":
        raise ModelSetupError(f"{what}: {path} is not a .safetensors file; pickled .ckpt/.pt files can run code "
                              "and are refused: convert it to safetensors")
    return p


def check_sd15(model_patcher, what: str = "checkpoint") -> None:
    """Refuse anything that is not an SD1.5-family UNet (the same rule as the nodes' check_sd15)."""
    import comfy.supported_models

    config = getattr(getattr(model_patcher, "model", None), "model_config", None)
    if not isinstance(config, comfy.supported_models.SD15):
        kind = type(config).__name__ if config is not None else type(model_patcher).__name__
        raise ModelSetupError(f"{what}: InstantFamily trains on SD1.5 models only, this is {kind}. SDXL, SD3 and "
                              "Flux have other text widths and attention layouts; use an SD1.5 checkpoint")


def load_base(path: str):
    """(ModelPatcher, CLIP, VAE) of an SD1.5 checkpoint through ComfyUI's own loader, UNet in fp32."""
    import comfy.sd

    p = _require_safetensors(path, "checkpoint")
    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(p), output_vae=True, output_clip=True, model_options={"dtype": torch.float32})
    except Exception as e:  # ComfyUI's detectors fail with assorted errors on foreign files
        raise ModelSetupError(f"checkpoint: ComfyUI could not load {p} as a diffusion model checkpoint "
                              f"({type(e).__name__}: {e}); "
                              "use an SD1.5 checkpoint (UNet + CLIP + VAE in one .safetensors)") from None
    check_sd15(model, f"checkpoint {p.name}")
    if clip is None or vae is None:
        raise ModelSetupError(f"checkpoint: {p} lacks the text encoder or the VAE; use a full SD1.5 checkpoint")
    return model, clip, vae


def _controlnet_kwargs(unet_config: dict) -> dict:
    # ComfyUI's unet_config also carries the loader's dtype/device/operations: ours are set explicitly.
    cfg = {k: v for k, v in unet_config.items() if k not in ("out_channels", "dtype", "device", "operations")}
    cfg["hint_channels"] = 3
    return cfg


def controlnet_from_unet(unet: nn.Module, unet_config: dict, seed: int = 0) -> nn.Module:
    """A cldm ControlNet with the UNet's config: time embedding, input blocks and middle block copied
    from the UNet; zero convolutions, the middle output conv and the hint encoder's last conv at zero
    (ControlNet paper), the rest of the hint encoder PyTorch-default initialised from ``seed``."""
    import comfy.cldm.cldm
    import comfy.ops

    net = comfy.cldm.cldm.ControlNet(**_controlnet_kwargs(unet_config), operations=comfy.ops.disable_weight_init,
                                     device="cpu", dtype=torch.float32)
    unet_sd = unet.state_dict()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("zero_convs.", "middle_block_out.")):
                p.zero_()
            elif name.startswith("input_hint_block."):
                p.fill_(float("nan"))  # set below; NaN if a layer type were missed
            else:
                src = unet_sd.get(name)
                if src is None or src.shape != p.shape:
                    raise ModelSetupError(f"ControlNet parameter {name!r} {tuple(p.shape)} has no UNet counterpart "
                                          f"({None if src is None else tuple(src.shape)}); the checkpoint's UNet "
                                          "config does not give an SD1.5 ControlNet")
                p.copy_(src.to(torch.float32))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            convs = [m for m in net.input_hint_block.modules() if isinstance(m, nn.Conv2d)]
            for m in convs:
                nn.Conv2d.reset_parameters(m)  # comfy.ops overrides reset_parameters with a no-op
            convs[-1].weight.zero_()
            convs[-1].bias.zero_()
    for name, p in net.named_parameters():
        if torch.isnan(p).any():
            raise RuntimeError(f"ControlNet init left {name!r} unset")
    return net


def _check_controlnet_shapes(path: Path, unet: nn.Module) -> None:
    """Before ComfyUI's loader guesses a model type: the encoder tensors a cldm file shares with the
    UNet (input blocks, middle block, time embedding) must have the UNet's shapes."""
    from safetensors import safe_open

    ref = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            prefix = "control_model." if any(k.startswith("control_model.") for k in keys) else ""
            for k in keys:
                name = k[len(prefix):] if k.startswith(prefix) else k
                if name.startswith(("input_blocks.", "middle_block.", "time_embed.")) and name in ref:
                    shape = tuple(f.get_slice(k).get_shape())
                    if shape != ref[name]:
                        raise ModelSetupError(
                            f"controlnet_init: {path.name} does not fit the checkpoint: {name} is {shape} in the "
                            f"ControlNet but {ref[name]} in the UNet; use an SD1.5 ControlNet made for this base "
                            "model's architecture")
    except ModelSetupError:
        raise
    except Exception as e:
        raise ModelSetupError(f"controlnet_init: {path} is not a readable safetensors file ({e})") from None


def controlnet_from_file(path: str, unet: nn.Module, unet_config: dict) -> nn.Module:
    """An SD1.5 (cldm) ControlNet file through ComfyUI's loader, checked against the UNet's shapes."""
    import comfy.controlnet

    p = _require_safetensors(path, "controlnet_init")
    _check_controlnet_shapes(p, unet)
    try:
        control = comfy.controlnet.load_controlnet(str(p), model_options={"dtype": torch.float32})
    except Exception as e:  # ComfyUI's detector raises assorted errors on foreign files
        raise ModelSetupError(f"controlnet_init: ComfyUI could not load {p} as a ControlNet ({type(e).__name__}: "
                              f"{e}); use an SD1.5 OpenPose ControlNet or leave controlnet_init empty") from None
    if control is None or type(control) is not comfy.controlnet.ControlNet:
        raise ModelSetupError(f"controlnet_init: {p} is not a standard (cldm) ControlNet "
                              f"({type(control).__name__}); use an SD1.5 OpenPose ControlNet")
    net = control.control_model
    ref = {k: v.shape for k, v in unet.state_dict().items()}
    got = net.state_dict()
    for k, v in got.items():
        if k.startswith(("input_blocks.", "middle_block.", "time_embed.")) and k in ref and ref[k] != v.shape:
            raise ModelSetupError(f"controlnet_init: {p} does not fit the checkpoint: {k} is {tuple(v.shape)} in the "
                                  f"ControlNet but {tuple(ref[k])} in the UNet; use a ControlNet for this base model "
                                  "(SD1.5)")
    hint = got.get("input_hint_block.0.weight")
    if hint is None or hint.shape[1] != 3:
        raise ModelSetupError(f"controlnet_init: {p} takes {None if hint is None else hint.shape[1]}-channel hints, "
                              "not RGB pose images; use an SD1.5 OpenPose ControlNet")
    missing = [k for k in ("input_blocks.0.0.weight", "middle_block_out.0.weight") if k not in got]
    ctx = [v.shape[1] for k, v in got.items() if k.endswith("attn2.to_k.weight")]
    if missing or not ctx or ctx[0] != unet_config.get("context_dim"):
        raise ModelSetupError(f"controlnet_init: {p} has context width {ctx[0] if ctx else None}, the checkpoint "
                              f"{unet_config.get('context_dim')}; use an SD1.5 ControlNet")
    return net.to(torch.float32)


# ---------------------------------------------------------------- gradient checkpointing

def _checkpointed(module: nn.Module, scope: "TrainModel") -> None:
    """Recompute ``module`` in backward instead of keeping its activations. The options the masked
    layers read are snapshotted at forward time (the hosts mutate their options dict while they run,
    and the ControlNet's binding lives in a context variable that backward does not see)."""
    import torch.utils.checkpoint

    inner_forward = module.forward

    def run(scope_options, *args, **kwargs):
        with binding_scope(scope_options) if scope_options is not None else contextlib.nullcontext():
            return inner_forward(*args, **kwargs)

    @functools.wraps(inner_forward)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner_forward(*args, **kwargs)
        if isinstance(kwargs.get("transformer_options"), dict):
            kwargs["transformer_options"] = dict(kwargs["transformer_options"])
        return torch.utils.checkpoint.checkpoint(run, scope._scope, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def _copy_for_next_block(h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
    return h.clone()


# ---------------------------------------------------------------- the model

class TrainModel(nn.Module):
    """Trained parts (``projection``, ``controlnet``) are registered submodules; the frozen UNet, VAE
    and CLIP are held outside the module tree so ``parameters()``/``state_dict()``/DDP see only what
    trains. ``forward(batch, generator)`` is :meth:`loss` (what DDP wraps)."""

    def __init__(self, cfg, meta: WeightMeta, projection: IDProjection, controlnet: nn.Module, unet: nn.Module,
                 alphas_cumprod: torch.Tensor, latent_scale, empty_text: torch.Tensor, clip=None, vae=None,
                 device: torch.device | str = "cpu", prediction: str = "eps"):
        super().__init__()
        self.cfg = cfg
        self.meta = meta
        self.projection = projection
        self.controlnet = controlnet
        object.__setattr__(self, "unet", unet)
        object.__setattr__(self, "clip", clip)
        object.__setattr__(self, "vae", vae)
        object.__setattr__(self, "latent_format", latent_scale)
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)
        self.register_buffer("empty_text", empty_text, persistent=False)
        self.device = torch.device(device)
        self.prediction = prediction   # "eps" (SD1.5) or "v": the UNet's output, as ComfyUI samples it
        self._scope: dict | None = None
        self.moa = None  # MoA experts + routers in the UNet (train/moa.py) when cfg.moa
        self.projection.requires_grad_(bool(cfg.train_projection))
        self.controlnet.requires_grad_(bool(cfg.train_controlnet))

    # ------------------------------------------------------------ construction
    @classmethod
    def build(cls, cfg, manifest: Manifest, device: torch.device | str = "cpu") -> "TrainModel":
        device = torch.device(device)
        if not manifest.has_local:
            raise ModelSetupError(f"data: the shards were encoded with {manifest.face_encoder!r}, which has no local "
                                  "feature map (L = 0); InstantFamily needs global + local face features: prepare "
                                  "the data with the insightface backend")
        model, clip, vae = load_base(cfg.checkpoint)
        unet = model.model.diffusion_model
        unet_config = dict(model.model.model_config.unet_config)
        d_k = int(unet_config.get("context_dim") or 0)
        if d_k != 768:
            raise ModelSetupError(f"checkpoint: context width {d_k}, SD1.5 has 768; use an SD1.5 checkpoint")
        if cfg.controlnet_init:
            controlnet = controlnet_from_file(cfg.controlnet_init, unet, unet_config)
        else:
            controlnet = controlnet_from_unet(unet, unet_config, seed=cfg.seed)
        # The one seam: the same masked layer class, keyed by module path, as the nodes install.
        install_layers(unet, wrap_cross_attention(unet))
        install_layers(controlnet, wrap_cross_attention(controlnet))

        meta = WeightMeta(face_encoder=manifest.face_encoder, L=int(manifest.L), d_gf=int(manifest.d_gf),
                          d_lf=int(manifest.d_lf), d_k=d_k, attention_mode=cfg.attention_mode,
                          train_n_ids=int(cfg.n_ids))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            projection = IDProjection(meta.projection_config)

        try:
            prediction = prediction_of(model)
        except ValueError as e:
            raise ModelSetupError(str(e)) from None
        sigmas = model.get_model_object("model_sampling").sigmas.detach().to(torch.float64).cpu()
        if sigmas.numel() != N_TRAIN_TIMESTEPS:
            raise ModelSetupError(f"checkpoint: {sigmas.numel()} training timesteps, SD1.5 has {N_TRAIN_TIMESTEPS}")
        alphas_cumprod = 1.0 / (1.0 + sigmas ** 2)
        with torch.no_grad():
            empty = clip.encode_from_tokens(clip.tokenize("")).float().cpu()

        unet.eval().requires_grad_(False)
        unet.to(device)
        self = cls(cfg, meta, projection, controlnet.to(device), unet, alphas_cumprod, model.model.latent_format,
                   empty, clip=clip, vae=vae, device=device, prediction=prediction)
        self.projection.to(device)
        self.to(device)
        if getattr(cfg, "moa", False):
            from .moa import attach   # MoA (issue 12): UNet attention -> MoA layers, group "moa"

            attach(self)
        if cfg.gradient_checkpointing:
            self.enable_gradient_checkpointing()
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the residual and transformer blocks of both networks in backward."""
        from comfy.ldm.modules.attention import BasicTransformerBlock
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

        for net in (self.unet, self.controlnet):
            for m in net.modules():
                if isinstance(m, (BasicTransformerBlock, ResBlock)):
                    _checkpointed(m, self)

    # ------------------------------------------------------------ trained parameters
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The enabled groups only: {"projection": [...], "controlnet": [...]}."""
        groups = {}
        if self.cfg.train_projection:
            groups["projection"] = list(self.projection.parameters())
        if self.cfg.train_controlnet:
            groups["controlnet"] = list(self.controlnet.parameters())
        if self.moa is not None:
            groups["moa"] = self.moa.parameters_list()
        return groups

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Both trained parts, whether or not their group is enabled (export needs the ControlNet either
        way): keys "projection.<name>" and "controlnet.<name>" (cldm key layout)."""
        out = {f"projection.{k}": v for k, v in self.projection.state_dict().items()}
        out.update({f"controlnet.{k}": v for k, v in self.controlnet.state_dict().items()})
        if self.moa is not None:
            out.update(self.moa.state())   # "moa.<module path>.<param>", the weight file's keys
        return out

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Strict: every key present with the same shape, nothing extra; errors name the first bad key."""
        own = self.trainable_state_dict()
        for k in sorted(own):
            if k not in sd:
                raise KeyError(f"trainable state: key {k!r} is missing (expected shape {tuple(own[k].shape)}); the "
                               "checkpoint was written by another model setup")
            if tuple(sd[k].shape) != tuple(own[k].shape):
                raise ValueError(f"trainable state: key {k!r} has shape {tuple(sd[k].shape)}, this model has "
                                 f"{tuple(own[k].shape)}; the checkpoint was written by another model setup")
        extra = sorted(set(sd) - set(own))
        if extra:
            raise KeyError(f"trainable state: unexpected key {extra[0]!r} ({len(extra)} in all); the checkpoint was "
                           "written by another model setup")
        self.projection.load_state_dict({k[len("projection."):]: v for k, v in sd.items() if k.startswith("projection.")})
        self.controlnet.load_state_dict({k[len("controlnet."):]: v for k, v in sd.items() if k.startswith("controlnet.")})
        if self.moa is not None:
            self.moa.load_state(sd)

    # ------------------------------------------------------------ inputs
    @property
    def autocast_dtype(self) -> torch.dtype | None:
        mp = self.cfg.mixed_precision
        if mp == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mp]

    def _autocast(self):
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def encode_latents(self, batch: Batch) -> torch.Tensor:
        """z0 in the UNet's latent space (ComfyUI's SD1.5 latent format applied)."""
        if batch.latent is not None:
            raw = batch.latent
        else:
            if self.vae is None:
                raise ModelSetupError("the batch has no cached latents and the model has no VAE")
            raw = self.vae.encode(((batch.image + 1.0) / 2.0).clamp(0, 1).movedim(1, -1))
        return self.latent_format.process_in(raw.to(self.device, torch.float32))

    @torch.no_grad()
    def encode_text(self, batch: Batch, drop: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, 768) text context; rows in ``drop`` get the empty prompt's embedding. Different
        lengths (long prompts: 154, 231) are repeated to a common multiple, as ComfyUI batches them."""
        if batch.text_embedding is not None:
            rows = [t.to(self.device, torch.float32) for t in batch.text_embedding]
        else:
            rows = [self.clip.encode_from_tokens(self.clip.tokenize(c)).to(self.device, torch.float32)[0]
                    for c in batch.caption]
        empty = self.empty_text[0].to(self.device, torch.float32)
        if drop is not None:
            rows = [empty if bool(d) else r for r, d in zip(rows, drop)]
        length = math.lcm(*(r.shape[0] for r in rows))
        return torch.stack([r.repeat(length // r.shape[0], 1) for r in rows])

    def id_tokens(self, batch: Batch, null: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, L*L+1, d_K): projected features; empty slots and rows in ``null`` get the projection of
        all-zero features (the null identity of ``IDProjection.null_tokens``)."""
        keep = batch.id_present.to(self.device)
        if null is not None:
            keep = keep & ~null.to(self.device)[:, None]
        k = keep.to(torch.float32)
        g = batch.id_global.to(self.device, torch.float32) * k[..., None]
        loc = batch.id_local.to(self.device, torch.float32) * k[..., None, None, None]
        return self.projection(g, loc)

    def binding(self, batch: Batch, layout) -> IdentityBinding:
        """Per-sample masks; strength 1 for filled slots (dropped IDs too: null tokens visible in their
        masks, as the uncond branch at inference), 0 for empty slots."""
        # On the model's device: the per-layer mask resizing then runs there too (4 grids a step).
        strength = batch.id_present.to(self.device, torch.float32)
        masks = batch.masks.to(self.device, torch.float32)
        if not getattr(self.cfg, "mask_ids", True):
            masks = torch.ones_like(masks)   # the unmasked baseline: every ID everywhere
        return IdentityBinding(layout, IDMasks(masks, strength), mode=self.cfg.attention_mode)

    # ------------------------------------------------------------ the networks
    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint: torch.Tensor,
                      binding: IdentityBinding) -> torch.Tensor:
        """The UNet's output for (z_t, t, K, control) (eps_theta for SD1.5, v for a v-prediction
        checkpoint): ControlNet then UNet, both running masked attention."""
        timesteps = t.to(z_t.dtype)
        dtype = self.autocast_dtype
        if dtype is not None and torch.is_autocast_enabled(self.device.type):
            # cast once: autocast would cast the fp32 context again for every layer's K and V (on CPU bf16
            # those copies were a sixth of the step)
            context = context.to(dtype)
        options = {OPTIONS_KEY: binding}
        self._scope = options
        try:
            with binding_scope(options):
                out = self.controlnet(x=z_t, hint=hint.to(z_t.dtype), timesteps=timesteps, context=context)
        finally:
            self._scope = None
        # The dict ComfyUI's ControlNet.control_merge hands the UNet (strength 1, no previous ControlNet).
        control = {"input": [], "middle": list(out["middle"]), "output": list(out["output"])}
        options = {OPTIONS_KEY: binding}
        if torch.is_grad_enabled():
            # ComfyUI's UNet adds control to its skip activations in place (apply_control: h += ctrl),
            # but the same tensors are saved for backward by the next input block. Its own hook after
            # the skip is stored lets the next block read a copy, so the in-place add hits a tensor
            # nothing saved; the result is the same as inference.
            options["patches"] = {"input_block_patch_after_skip": [_copy_for_next_block]}
        if self.moa is not None:
            options.update(self.moa.options())
        return self.unet(z_t, timesteps=timesteps, context=context, control=control, transformer_options=options)

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Scalar MSE to the target (eq. 3; the noise for eps-prediction); timesteps and noise come from
        ``generator`` only."""
        z0 = self.encode_latents(batch)
        b = z0.shape[0]
        text = self.encode_text(batch, batch.drop_text)
        t = torch.randint(0, N_TRAIN_TIMESTEPS, (b,), generator=generator, device=generator.device).to(self.device)
        noise = torch.randn(z0.shape, generator=generator, device=generator.device, dtype=torch.float32).to(self.device)
        a = self.alphas_cumprod[t].to(torch.float32).view(b, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with self._autocast():
            context, layout = stack_context(text, self.id_tokens(batch, batch.drop_ids).to(text.dtype))
            out = self.predict_noise(z_t, t, context, batch.control.to(self.device), self.binding(batch, layout))
        target = training_target(self.prediction, z0, noise, a)
        if self.moa is not None:
            return self.moa.loss(out, target, batch)   # reconstruction (+ masked option) + router loss
        w = float(getattr(self.cfg, "face_loss_weight", 0.0))
        return weighted_mse(out, target, foreground(batch, self.device) if w else None, w)

    def forward(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        return self.loss(batch, generator)

    # ------------------------------------------------------------ validation pictures
    @torch.no_grad()
    def sample(self, batch: Batch, steps: int = 20, cfg_scale: float = 5.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, R, R) in [0, 1]: deterministic DDIM from noise, classifier-free guidance against the
        empty prompt + null IDs (same masks), the batch's control image on both branches."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        b = batch.size
        res = batch.control.shape[-1]
        shape = (b, self.latent_format.latent_channels, res // 8, res // 8)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        x = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(self.device)
        no_drop = torch.zeros(b, dtype=torch.bool)
        cond_text = self.encode_text(batch, no_drop)
        uncond_text = self.encode_text(batch, ~no_drop)
        with self._autocast():
            cond, layout = stack_context(cond_text, self.id_tokens(batch).to(cond_text.dtype))
            uncond, _ = stack_context(uncond_text, self.id_tokens(batch, ~no_drop).to(cond_text.dtype))
        context = torch.cat([cond, uncond])
        both = Batch(**{**batch.__dict__, "masks": torch.cat([batch.masks, batch.masks]),
                        "id_present": torch.cat([batch.id_present, batch.id_present])})
        binding = self.binding(both, layout)
        hint = torch.cat([batch.control, batch.control]).to(self.device)
        ts = torch.linspace(N_TRAIN_TIMESTEPS - 1, 0, steps).round().long()
        ac = self.alphas_cumprod.to(torch.float32)
        was_training = self.training
        self.eval()
        try:
            for i, t in enumerate(ts):
                with self._autocast():
                    out = self.predict_noise(torch.cat([x, x]), t.repeat(2 * b).to(self.device), context, hint,
                                             binding).float()
                o_c, o_u = out.chunk(2)
                a = ac[t]
                a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=ac.device)
                # guidance is linear, so mixing the outputs equals mixing the eps they imply
                e, x0 = eps_and_x0(self.prediction, o_u + cfg_scale * (o_c - o_u), x, a)
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
        finally:
            self.train(was_training)
        img = self.vae.decode(self.latent_format.process_out(x))
        return img.movedim(-1, 1).clamp(0, 1).float().cpu()

    def weight_metadata(self) -> dict[str, str]:
        """Extra metadata for the exported weight file: the training config as JSON."""
        return {"train_config": json.dumps(self.cfg.to_dict(), sort_keys=True, default=str)}


def projection_config_of(sd: dict[str, torch.Tensor]) -> ProjectionConfig:
    """The projection shapes a trainable state dict holds (for export without the data manifest)."""
    g = sd["projection.global_proj.weight"]
    loc = sd["projection.local_proj.weight"]
    return ProjectionConfig(d_gf=int(g.shape[1]), d_lf=int(loc.shape[1]),
                            side=int(sd["projection.pos_row"].shape[0]), d_k=int(g.shape[0]))


def iter_params(model: TrainModel) -> Iterator[tuple[str, nn.Parameter]]:
    """(group, parameter) for every enabled trained parameter."""
    for group, params in model.param_groups().items():
        for p in params:
            yield group, p
