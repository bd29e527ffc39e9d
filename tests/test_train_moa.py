"""MoA in the trainer (train/moa.py through TrainModel): real ComfyUI model code, the tiny set, CPU.

References: the UNet's own weights (experts start as copies), the router loss at initialisation worked
by hand (zero routers give w_prior = 1/2 everywhere), the nodes' MoA layers built on a model that
ComfyUI's own loader loaded (the exported tensors must fit them), and a falling router loss.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import test_train_model
import torch
import torch.nn.functional as F
from instantfamily_nodes.attention.moa import (
    MoAConfig,
    MoALayer,
    load_moa_state_dict,
    moa_layers,
)
from instantfamily_nodes.train.batch import make_batch
from test_train_model import build, cfg_for, make_sample

# The trainer tests' fixtures: the tiny set; one thread (conftest) as in the trainer's tests.
tiny = test_train_model.tiny
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch():
    return make_batch([make_sample(2, 11), make_sample(3, 12)], cfg_for(), np.random.default_rng(3))


@pytest.fixture(scope="module")
def moa_model(tiny):
    return build(tiny, moa=True)


def test_moa_layers_start_as_copies_and_train_as_their_own_group(moa_model):
    m = moa_model
    layers = {p: mod for p, mod in m.unet.named_modules() if isinstance(mod, MoALayer)}
    assert len(layers) == 16 and all(p.endswith("attn2") for p in layers)
    for layer in layers.values():
        assert torch.equal(layer.expert.to_k.weight, layer.to_k.weight)            # initialised from the layer
        assert layer.expert.to_k.weight.data_ptr() != layer.to_k.weight.data_ptr()  # ... as a copy
        assert not layer.to_k.weight.requires_grad and layer.expert.to_k.weight.requires_grad
    groups = m.param_groups()
    own = {id(p) for lay in layers.values() for p in lay.trainable_parameters()}
    assert {id(p) for p in groups["moa"]} == own
    assert not own & {id(p) for g in ("projection", "controlnet") for p in groups[g]}
    penalised = [p for p, lay in layers.items() if lay.penalised]
    assert len(penalised) == 11          # 16 minus the first two and the last three
    assert not layers["input_blocks.1.1.transformer_blocks.0.attn2"].penalised
    assert not layers["output_blocks.11.1.transformer_blocks.0.attn2"].penalised
    assert layers["output_blocks.8.1.transformer_blocks.0.attn2"].penalised


def test_router_loss_at_init_equals_the_hand_computation(moa_model, batch):
    """Zero-initialised routers: w_prior = 1/2 at every pixel, so each penalised layer adds
    mean(1 - M) / 4, M the union of the sample's ID masks area-resized to the layer's grid."""
    m = moa_model
    with torch.no_grad():
        total = m.loss(batch, torch.Generator().manual_seed(0))
    fg = (batch.masks * batch.id_present[..., None, None].float()).amax(1, keepdim=True)
    # The tiny UNet at R = 64 (latent 8x8): attention grids 8x8 (input 1, 2; output 9-11), 4x4 (input 4, 5;
    # output 6-8), 2x2 (input 7, 8; output 3-5), 1x1 (middle). Penalised: input 4, 5, 7, 8, middle, output 3-8.
    sizes = [4, 4, 2, 2, 1, 2, 2, 2, 4, 4, 4]
    want = sum(float((1 - F.interpolate(fg, size=(s, s), mode="area")).mean()) / 4 for s in sizes)
    assert float(m.moa.last["router"]) == pytest.approx(want, rel=1e-5)
    assert float(total) == pytest.approx(float(m.moa.last["reconstruction"]) + 1e-4 * want, rel=1e-6)


def test_trainable_state_round_trips_and_fits_the_nodes_layers(moa_model, tiny, tmp_path):
    import comfy.sd

    sd = moa_model.trainable_state_dict()
    moa_keys = [k for k in sd if k.startswith("moa.")]
    assert "moa.input_blocks.1.1.transformer_blocks.0.attn2.router.weight" in moa_keys
    assert "moa.middle_block.1.transformer_blocks.0.attn2.expert.to_out.0.bias" in moa_keys
    changed = {k: (v + 1 if k in moa_keys else v) for k, v in sd.items()}
    moa_model.load_trainable_state_dict(changed)
    assert all(torch.equal(moa_model.trainable_state_dict()[k], changed[k]) for k in moa_keys)
    moa_model.load_trainable_state_dict(sd)
    # The exported tensors load into the MoA layers the nodes build on ComfyUI's own model.
    model, *_ = comfy.sd.load_checkpoint_guess_config(str(tiny.root / "checkpoints" / tiny.checkpoint))
    layers = moa_layers(model.get_model_object("diffusion_model"), MoAConfig(), share_expert=False)
    load_moa_state_dict(layers, {k: sd[k] for k in moa_keys})
    lay = layers["middle_block.1.transformer_blocks.0.attn2"]
    assert torch.equal(lay.expert.to_out[0].bias.float(),
                       sd["moa.middle_block.1.transformer_blocks.0.attn2.expert.to_out.0.bias"].float())


def test_a_few_steps_make_the_router_loss_fall(tiny, batch):
    """The router loss trains the routers towards the prior on the background. Weight 1 instead of
    the paper's 1e-4: on this random tiny UNet with random pictures the reconstruction term's
    gradient on the routers is large noise, which 1e-4 of the router loss cannot outweigh in a few
    steps (with 1e-4 the router loss wanders: 2.27, 2.30, 2.54, 2.60, 2.40, 2.28 over 6 steps)."""
    m = build(tiny, moa=True, train_projection=False, train_controlnet=False, moa_router_weight=1.0)
    opt = torch.optim.AdamW(m.param_groups()["moa"], lr=1e-2, weight_decay=0.0)
    routers = []
    for step in range(6):
        opt.zero_grad(set_to_none=True)
        loss = m.loss(batch, torch.Generator().manual_seed(step))
        loss.backward()
        opt.step()
        routers.append(float(m.moa.last["router"]))
    assert all(np.isfinite(routers))
    assert all(b < a for a, b in itertools.pairwise(routers)), routers
    assert routers[-1] < 0.7 * routers[0], routers


def test_masked_loss_counts_foreground_pixels_only():
    from instantfamily_nodes.train.loss import masked_mse

    eps, noise = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    noise[..., :4] = 2.0                              # error 4 on the left half
    fg = torch.zeros(1, 1, 64, 64)
    fg[..., 32:] = 1                                  # foreground: the right half
    assert float(masked_mse(eps, noise, fg)) == 0.0
    fg[..., :32] = 1
    assert float(masked_mse(eps, noise, fg)) == pytest.approx(2.0)   # all pixels: mean of 4 and 0
    assert float(masked_mse(eps, noise, torch.zeros(1, 1, 64, 64))) == pytest.approx(2.0)  # no fg: plain MSE


def test_gradient_checkpointing_gives_the_same_moa_loss_and_gradients(tiny, moa_model, batch):
    """Recomputed blocks record the routers again in backward; the loss counts the forward pass only,
    so losses and gradients (routers and experts included) equal the run without checkpointing."""
    ck = build(tiny, moa=True, gradient_checkpointing=True)
    ck.load_trainable_state_dict(moa_model.trainable_state_dict())
    results = []
    for m in (moa_model, ck):
        m.zero_grad(set_to_none=True)
        loss = m.loss(batch, torch.Generator().manual_seed(4))
        loss.backward()
        results.append((loss.detach(), float(m.moa.last["router"]),
                        {n: p.grad.clone() for n, p in m.moa.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-6)
    assert results[0][2].keys() == results[1][2].keys() and len(results[0][2]) == len(list(ck.moa.parameters()))
    for n in results[0][2]:
        torch.testing.assert_close(results[0][2][n], results[1][2][n], rtol=1e-4, atol=1e-7, msg=n)
    moa_model.zero_grad(set_to_none=True)


def test_export_writes_the_moa_tensors_into_the_pack_weight_file(moa_model, tmp_path):
    from instantfamily_nodes.models.weights import load_weights
    from instantfamily_nodes.train.export import export_files

    sd = moa_model.trainable_state_dict()
    export_files(sd, moa_model.cfg.to_dict(), tmp_path / "w.safetensors", tmp_path / "c.safetensors",
                 face_encoder="insightface/antelopev2")
    w = load_weights(tmp_path / "w.safetensors")
    moa = {k: v for k, v in sd.items() if k.startswith("moa.")}
    assert moa and set(w.group("moa")) == {k[len("moa."):] for k in moa}
    assert all(torch.equal(w.tensors[k], v.float()) for k, v in moa.items())


def test_fit_with_moa_trains_checkpoints_and_resumes(tiny, tmp_path):
    """The real loop (train/fit.py): the 'moa' group gets lr_moa, checkpoints carry the moa.* tensors,
    and a resume loads them back (strictly) and goes on."""
    import test_train_fit
    from instantfamily_nodes.train import fit as F
    from instantfamily_nodes.train.checkpoint import load_checkpoint
    from instantfamily_nodes.train.model import TrainModel
    from instantfamily_nodes.train.shards import Manifest

    data = tmp_path / "shards"
    test_train_fit.write_shards(data, n_shards=2, per_shard=4)
    cfg = test_train_fit.cfg_for(data, tmp_path / "run", tiny, moa=True, lr_moa=1e-3, steps=2, checkpoint_every=2,
                                 keep_last=1)
    model = TrainModel.build(cfg, Manifest.load(cfg.data), "cpu")
    before = {k: v.clone() for k, v in model.moa.state().items()}
    res = F.fit(cfg, model=model, progress=False)
    assert res.step == 2 and not res.stopped and all(np.isfinite(res.losses))
    ck = load_checkpoint(tmp_path / "run" / "checkpoints")
    moa_keys = [k for k in ck.model_state if k.startswith("moa.")]
    assert len(moa_keys) == len(before)
    assert any(not torch.equal(ck.model_state[k], before[k]) for k in moa_keys)   # the experts/routers trained
    cfg4 = test_train_fit.cfg_for(data, tmp_path / "run", tiny, moa=True, lr_moa=1e-3, steps=4, checkpoint_every=2,
                                  keep_last=1)
    resumed = TrainModel.build(cfg4, Manifest.load(cfg4.data), "cpu")
    res = F.fit(cfg4, resume=True, model=resumed, progress=False)
    assert res.step == 4 and not res.stopped
