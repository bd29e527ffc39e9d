"""A tiny SD1.5-shaped model set that ComfyUI's own loaders accept, so whole graphs run on CPU in seconds.

Built files (ComfyUI models-folder layout, so an ``extra_model_paths.yaml`` can point at it)::

    <root>/checkpoints/instantfamily_tiny_sd15.safetensors   UNet + CLIP + VAE, SD1.5 key layout
    <root>/controlnet/instantfamily_tiny_openpose.safetensors cldm ControlNet, same tiny UNet config
    <root>/instantfamily/instantfamily_tiny.safetensors       pack weights (ID projection) for the faces below
    <root>/insightface/models/antelopev2/*.onnx               synthetic insightface-shaped pack
    <root>/custom_nodes/instantfamily_tiny_models.py          registers the tiny model type in a ComfyUI server
    <root>/extra_model_paths.yaml

What "tiny" means, and why:
- UNet: SD1.5's layout (attention at the first three levels, 2 res blocks, one transformer per block, 16
  cross-attention blocks with the same (block, index) keys) with model_channels=32, channel_mult=[1,2,2,2],
  4 heads. context_dim stays 768 so the pack's ID tokens, CLIP's width and the cross-attention keys have
  exactly SD1.5's width.
- CLIP: SD1.5's text encoder keys and width (hidden 768, 77 positions, ComfyUI's own SD1 tokenizer), but one
  layer, a 128-wide MLP and a token table of 1024 rows: token ids are taken modulo 1024. The full
  49408 x 768 table alone would be 150 MB; with the modulo the checkpoint stays a few MB and every prompt
  still gives 77 x 768 context exactly like SD1.5.
- VAE: TAESD (ComfyUI's own class, detected from ``first_stage_model.taesd_*`` keys), 8x down-scaling and 4
  latent channels like SD1.5's VAE.
- ComfyUI only detects SD1.5 by 320 channels, so these files need :func:`register_tiny_model_type` in the
  process that loads them. The pack never calls it at import: only the demo and the tests do (and, in a
  server, the ``custom_nodes`` shim written next to the models).

Weights are random but explicitly initialised (ComfyUI's layers start as ``torch.empty``), seeded, and
stored as fp16. The pictures they make are noise-like: this set proves plumbing, not quality.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_CHECKPOINT = "instantfamily_tiny_sd15.safetensors"
TINY_CONTROLNET = "instantfamily_tiny_openpose.safetensors"
TINY_WEIGHTS = "instantfamily_tiny.safetensors"
FACE_PACK = "antelopev2"
TOKEN_ROWS = 1024
FORMAT_TAG = "instantfamily-tiny-v1"
WORLD_LATENT_CHANNELS = 16        # the synthetic world base (synthetic/base.py): 8x down, 16 channels  # bump when the layout changes: cached sets are rebuilt

# Exactly what ComfyUI's detector reads back from the keys (comfy.model_detection.detect_unet_config).
UNET_CONFIG: dict = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "channel_mult": [1, 2, 2, 2],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
UNET_EXTRA = {"num_heads": 4, "num_head_channels": -1}
CLIP_CONFIG: dict = {
    "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 128, "num_attention_heads": 12,
    "num_hidden_layers": 1, "max_position_embeddings": 77, "eos_token_id": 49407, "vocab_size": TOKEN_ROWS,
    "layer_norm_eps": 1e-05,
}

_REGISTERED: list[type] = []


# ---------------------------------------------------------------- the test-only model type

def _tiny_clip_classes():
    """CLIP classes for the tiny type: SD1's text encoder with a 1024-row token table (ids modulo 1024)."""
    import comfy.clip_model
    import comfy.sd1_clip

    class TinyCLIPTextModel(comfy.clip_model.CLIPTextModel):
        def __init__(self, config_dict, dtype, device, operations):
            super().__init__(config_dict, dtype, device, operations)
            base = operations.Embedding

            class ModuloEmbedding(base):
                # Every SD1 token id (0..49407) maps onto the small table; shapes out are SD1.5's.
                def forward(self, input, *args, **kwargs):
                    return super().forward(torch.remainder(input, self.num_embeddings), *args, **kwargs)

            emb = self.text_model.embeddings
            # The replaced 49408-row table was torch.empty: never touched, so it cost no memory.
            emb.token_embedding = ModuloEmbedding(config_dict["vocab_size"], config_dict["hidden_size"],
                                                  dtype=dtype, device=device)

    class TinyCheckpointClipModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, model_options=model_options, return_projected_pooled=False,
                             textmodel_json_config=dict(CLIP_CONFIG), model_class=TinyCLIPTextModel)

    class TinySD1ClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options,
                             clip_model=TinyCheckpointClipModel, **kwargs)

    return TinyCLIPTextModel, TinySD1ClipModel


def _world_latent_format() -> type:
    import comfy.latent_formats

    class WorldLatent(comfy.latent_formats.LatentFormat):
        # The world VAE's own vae_scale / vae_shift already give zero-mean latents of std BaseConfig.latent_std.
        latent_channels = WORLD_LATENT_CHANNELS
        scale_factor = 1.0

    return WorldLatent


def register_tiny_model_type() -> type:
    """Teach this process's ComfyUI to load the tiny checkpoint/ControlNet and the synthetic world's base
    (same UNet, WORLD_LATENT_CHANNELS latent channels; synthetic/base.py). Idempotent; returns the tiny class.

    Test/demo only: it adds model types matching context 768 with channel_mult [1, 2, 2, 2] (the tiny one
    also model_channels=32, the world one in_channels 16), which no real model has."""
    import comfy.supported_models
    import comfy.supported_models_base

    for cls in comfy.supported_models.models:
        if getattr(cls, "instantfamily_tiny", False) and not getattr(cls, "instantfamily_world", False):
            return cls
    _, tiny_clip = _tiny_clip_classes()

    class InstantFamilyTinySD15(comfy.supported_models.SD15):
        instantfamily_tiny = True
        unet_config = {"context_dim": 768, "model_channels": UNET_CONFIG["model_channels"],
                       "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False,
                       "channel_mult": UNET_CONFIG["channel_mult"]}
        unet_extra_config = dict(UNET_EXTRA)

        def model_type(self, state_dict, prefix=""):
            import comfy.model_base

            # ComfyUI's own mark (model_base writes it when it saves a v model): a top-level "v_pred" key
            v = "v_pred" in state_dict
            return comfy.model_base.ModelType.V_PREDICTION if v else comfy.model_base.ModelType.EPS

        def clip_target(self, state_dict={}):
            import comfy.sd1_clip

            return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, tiny_clip)

    class InstantFamilyWorldSD15(InstantFamilyTinySD15):
        instantfamily_world = True
        # any width: synthetic base --unet-channels trains wider world UNets; in_channels 16 and context 768
        # with channel_mult [1, 2, 2, 2] still match nothing real
        unet_config = {**{k: v for k, v in InstantFamilyTinySD15.unet_config.items() if k != "model_channels"},
                       "in_channels": WORLD_LATENT_CHANNELS}
        latent_format = _world_latent_format()

        def inpaint_model(self):
            # ComfyUI reads in_channels > 4 as an inpainting UNet; here the latent itself has 16 channels.
            return False

    # First in the list: they match nothing real, and nothing earlier may claim the tiny files; the world
    # type before the tiny one, whose config (no in_channels) would match the world's files too.
    comfy.supported_models.models.insert(0, InstantFamilyTinySD15)
    comfy.supported_models.models.insert(0, InstantFamilyWorldSD15)
    _REGISTERED.extend([InstantFamilyTinySD15, InstantFamilyWorldSD15])
    return InstantFamilyTinySD15


# ---------------------------------------------------------------- weights

def init_weights(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic PyTorch-default init for every parameter (ComfyUI's ops skip init on purpose).

    Parameters are first filled with NaN; any left NaN afterwards means a layer type was missed."""
    nn = torch.nn
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            for p in module.parameters():
                p.fill_(float("nan"))
            for m in module.modules():
                # Call torch's own reset_parameters: comfy.ops subclasses override it with a no-op.
                for base in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm, nn.Embedding):
                    if isinstance(m, base):
                        base.reset_parameters(m)
                        break
            for name, p in module.named_parameters():
                if torch.isnan(p).any():
                    if p.ndim == 0:  # scalars such as TAESD's vae_scale / vae_shift
                        p.fill_(1.0 if "scale" in name else 0.0)
                    else:
                        raise RuntimeError(f"tiny model: parameter {name!r} was left uninitialised")
    finally:
        torch.random.set_rng_state(gen_state)
    return module


def _ops():
    import comfy.ops

    return comfy.ops.disable_weight_init


def unet_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**UNET_CONFIG, **UNET_EXTRA, operations=_ops(), device="cpu", dtype=torch.float32)
    init_weights(unet, seed)
    return unet.state_dict()


def controlnet_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """cldm ControlNet with the tiny UNet's config (SD1.5 ControlNet key layout, no 'control_model.' prefix,
    like the common *_fp16.safetensors files). Zero convs get random weights so the control visibly acts."""
    from comfy.cldm.cldm import ControlNet

    cfg = {k: v for k, v in UNET_CONFIG.items() if k != "out_channels"}
    net = ControlNet(**cfg, **UNET_EXTRA, hint_channels=3, operations=_ops(), device="cpu", dtype=torch.float32)
    init_weights(net, seed)
    return net.state_dict()


def clip_state_dict(seed: int = 2) -> dict[str, torch.Tensor]:
    import comfy.ops

    text_model_cls, _ = _tiny_clip_classes()
    clip = text_model_cls(dict(CLIP_CONFIG), torch.float32, "cpu", comfy.ops.manual_cast)
    init_weights(clip, seed)
    sd = clip.state_dict()
    sd.pop("text_projection.weight", None)  # SD1.5 checkpoints have none either
    return sd


def taesd_state_dict(seed: int = 3) -> dict[str, torch.Tensor]:
    import comfy.taesd.taesd

    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    init_weights(vae, seed)
    return vae.state_dict()


def checkpoint_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """One SD1.5-layout checkpoint: model.diffusion_model.*, cond_stage_model.transformer.*, first_stage_model.*"""
    sd: dict[str, torch.Tensor] = {}
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet_state_dict(seed).items()})
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_state_dict(seed + 2).items()})
    sd.update({f"first_stage_model.{k}": v for k, v in taesd_state_dict(seed + 3).items()})
    return sd


def _save(sd: dict[str, torch.Tensor], path: Path, what: str) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}, str(tmp),
              metadata={"instantfamily_tiny": FORMAT_TAG, "what": what})
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file


def pack_weights(path: Path, seed: int = 4) -> None:
    """The pack's weight file for the synthetic face pack (ArcFace-shaped: 64-d global, 7x7x128 local)."""
    from ..models import IDProjection, WeightMeta, save_weights

    meta = WeightMeta(face_encoder=f"insightface/{FACE_PACK}", L=7, d_gf=64, d_lf=128, d_k=768,
                      attention_mode="hard", train_n_ids=4)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        proj = IDProjection(meta.projection_config)  # a plain torch module: its own init, seeded
    finally:
        torch.random.set_rng_state(gen_state)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, meta, proj)


# ---------------------------------------------------------------- the folder

SHIM = '''"""Registers InstantFamily's tiny test model type in this ComfyUI process (written by
instantfamily_nodes.demo.tiny; only present in a tiny demo/test models folder, never in a user's)."""
from instantfamily_nodes.demo.tiny import register_tiny_model_type

register_tiny_model_type()
NODE_CLASS_MAPPINGS = {}
'''


@dataclass(frozen=True)
class TinyModels:
    root: Path
    checkpoint: str = TINY_CHECKPOINT          # names as ComfyUI's loaders list them
    controlnet: str = TINY_CONTROLNET
    weights: str = TINY_WEIGHTS
    face_pack: str = FACE_PACK

    @property
    def extra_model_paths(self) -> Path:
        return self.root / "extra_model_paths.yaml"

    @property
    def shim_dir(self) -> Path:
        return self.root / "custom_nodes"


def write_extra_model_paths(root: Path, custom_nodes: list[str | os.PathLike] = (), name: str = "instantfamily_tiny",
                            path: Path | None = None) -> Path:
    """An extra_model_paths.yaml pointing ComfyUI at ``root``'s model folders (and ``custom_nodes`` folders)."""
    lines = [f"{name}:", f"    base_path: {json.dumps(str(root))}"]
    for key, sub in (("checkpoints", "checkpoints"), ("controlnet", "controlnet"), ("vae", "vae"),
                     ("vae_approx", "vae_approx"), ("instantfamily", "instantfamily"),
                     ("insightface", "insightface")):
        lines.append(f"    {key}: {sub}")
    if custom_nodes:
        # a YAML block: one folder per line, as ComfyUI's loader splits on newlines
        lines.append("    custom_nodes: |")
        lines += [f"        {Path(p).resolve()}" for p in custom_nodes]
    path = path or root / "extra_model_paths.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def build_tiny_models(root: str | os.PathLike, seed: int = 0, custom_nodes: list[str | os.PathLike] = (),
                      force: bool = False) -> TinyModels:
    """Write the tiny set into ``root`` (skipped when an identical set is already there) and the yaml.

    ``custom_nodes``: extra custom-node folders for the yaml (e.g. one holding the pack); the shim folder
    that registers the tiny model type is always added."""
    root = Path(root).resolve()
    models = TinyModels(root)
    stamp = root / ".instantfamily_tiny"
    tag = f"{FORMAT_TAG} seed={seed}"
    if force or not stamp.is_file() or stamp.read_text().strip() != tag:
        register_tiny_model_type()
        _save(checkpoint_state_dict(seed), root / "checkpoints" / TINY_CHECKPOINT, "checkpoint")
        _save(controlnet_state_dict(seed + 1), root / "controlnet" / TINY_CONTROLNET, "controlnet")
        pack_weights(root / "instantfamily" / TINY_WEIGHTS, seed + 4)
        from ..models.faces import synthetic

        synthetic.make_model_pack(root / "insightface", FACE_PACK)
        for sub in ("vae", "vae_approx"):
            (root / sub).mkdir(exist_ok=True)
        models.shim_dir.mkdir(exist_ok=True)
        (models.shim_dir / "instantfamily_tiny_models.py").write_text(SHIM)
        stamp.write_text(tag + "\n")
    write_extra_model_paths(root, [models.shim_dir, *custom_nodes])
    return models


def is_tiny_checkpoint(path: str | os.PathLike) -> bool:
    """True for a file written by this module (its safetensors metadata says so)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("instantfamily_tiny") is not None
    except Exception:
        return False
