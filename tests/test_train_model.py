"""The trainer's batch builder and model: real ComfyUI model code, the tiny SD1.5-shaped set, CPU.

make_batch is checked against the pack's own pose/mask code and the palette (independent of the batch
code's bookkeeping); the model against the UNet's weights, exact zero/nonzero gradient structure,
masked-attention isolation measured inside a real UNet and ControlNet layer, and an overfit run.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from instantfamily_nodes.palette import ID_COLORS, id_color
from instantfamily_nodes.pose.masks import id_masks
from instantfamily_nodes.train.batch import make_batch
from instantfamily_nodes.train.config import TrainConfig
from instantfamily_nodes.train.shards import Manifest, Sample

R = 64            # training resolution in these tests (latent 8 x 8; attention grids 8, 4, 2)
D_GF, L, D_LF = 64, 7, 128   # the tiny set's synthetic face pack (demo/tiny.py)


def make_sample(n_faces: int, seed: int = 0, key: str = "s", size: int = R, head_joints: bool = False) -> Sample:
    """Faces side by side in a row (boxes 12 px wide), one person per face. Without ``head_joints`` the
    skeletons have no head joints, so a face-box centre is black unless a circle is drawn there."""
    rng = np.random.default_rng(seed)
    s = size / R
    step = 15 if n_faces <= 4 else 10
    boxes = np.array([[2 + step * j, 6, step - 1 + step * j, 21] for j in range(n_faces)], np.float32) * s
    pose = np.zeros((n_faces, 18, 3), np.float32)
    for j in range(n_faces):
        cx = (boxes[j, 0] + boxes[j, 2]) / 2 / s
        pose[j, 1] = [cx * s, 34 * s, 1]          # neck
        pose[j, 2] = [(cx - 4) * s, 36 * s, 1]    # right shoulder
        pose[j, 5] = [(cx + 4) * s, 36 * s, 1]    # left shoulder
        pose[j, 8] = [(cx - 3) * s, 56 * s, 1]    # right hip
        if head_joints:
            pose[j, 0] = [cx * s, 14 * s, 1]
    return Sample(key=f"{key}{seed}", image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                  caption="a photo of a family", face_boxes=boxes, face_kps=np.zeros((n_faces, 5, 2), np.float32),
                  face_embedding=rng.standard_normal((n_faces, D_GF)).astype(np.float32),
                  face_local=rng.standard_normal((n_faces, L, L, D_LF)).astype(np.float32), pose=pose,
                  face_person=list(range(n_faces)))


def cfg_for(**kw) -> TrainConfig:
    base = dict(resolution=R, n_ids=4, batch_size=2, text_dropout=0.0, id_dropout=0.0)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------- make_batch

def test_random_slots_cover_every_order_and_min_n_faces_are_chosen():
    cfg = cfg_for()
    four, two, six = make_sample(4, 1), make_sample(2, 2), make_sample(6, 3)
    orders4, slots2, chosen6 = set(), set(), set()
    for seed in range(400):
        b = make_batch([four, two, six], cfg, np.random.default_rng(seed))
        fi = b.face_index.numpy()
        assert b.id_present.sum(1).tolist() == [4, 2, 4]                 # min(N, N')
        assert (b.id_present.numpy() == (fi >= 0)).all()
        orders4.add(tuple(fi[0]))
        slots2.add(tuple(fi[1]))
        chosen6.update(int(f) for f in fi[2] if f >= 0)
        assert len(set(fi[2][fi[2] >= 0])) == 4                           # no face twice
    assert orders4 == set(itertools.permutations(range(4)))               # all 24 orders
    # two faces: each face in each slot, empty slots anywhere (all 4*3 placements)
    assert len(slots2) == 12
    assert chosen6 == set(range(6))


def test_features_masks_and_circles_follow_the_chosen_faces():
    cfg = cfg_for()
    s = make_sample(6, 5)
    for seed in range(5):
        b = make_batch([s], cfg, np.random.default_rng(seed))
        fi = b.face_index[0].tolist()
        control = (b.control[0].permute(1, 2, 0).numpy() * 255).round().astype(int)
        chosen = [f for f in fi if f >= 0]
        for slot, f in enumerate(fi):
            if f < 0:
                assert b.masks[0, slot].abs().sum() == 0 and b.id_global[0, slot].abs().sum() == 0
                assert b.id_local[0, slot].abs().sum() == 0
                continue
            np.testing.assert_array_equal(b.id_global[0, slot].numpy(), s.face_embedding[f])
            np.testing.assert_array_equal(b.id_local[0, slot].numpy(), s.face_local[f])
            # the nodes' mask code, margin 25 %, one face at a time
            np.testing.assert_array_equal(b.masks[0, slot].numpy(), id_masks([s.face_boxes[f]], (R, R), 0.25)[0])
            cx, cy = (s.face_boxes[f][0] + s.face_boxes[f][2]) / 2, (s.face_boxes[f][1] + s.face_boxes[f][3]) / 2
            assert tuple(control[int(cy), int(cx)]) == id_color(slot), (seed, slot, f)
        for f in set(range(6)) - set(chosen):
            cx, cy = (s.face_boxes[f][0] + s.face_boxes[f][2]) / 2, (s.face_boxes[f][1] + s.face_boxes[f][3]) / 2
            assert tuple(control[int(cy), int(cx)]) == (0, 0, 0)          # no circle for an unchosen face
        palette = {tuple(c) for c in ID_COLORS}
        used = {tuple(p) for p in control.reshape(-1, 3)} & palette
        assert used == {id_color(slot) for slot, f in enumerate(fi) if f >= 0}
        # every person's skeleton is drawn, chosen or not: something non-black around each neck
        for p in s.pose:
            x, y = int(p[1, 0]), int(p[1, 1])
            assert control[y - 2:y + 3, x - 2:x + 3].sum() > 0


def test_batch_is_a_pure_function_of_rng_and_dropout_rates_apply():
    cfg = cfg_for(text_dropout=0.5, id_dropout=0.5)
    samples = [make_sample(3, i) for i in range(8)]
    a = make_batch(samples, cfg, np.random.default_rng(7))
    b = make_batch(samples, cfg, np.random.default_rng(7))
    for name in ("image", "id_global", "id_local", "id_present", "masks", "control", "drop_text", "drop_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    all_drop = make_batch(samples, cfg_for(text_dropout=1.0, id_dropout=1.0), np.random.default_rng(0))
    assert all_drop.drop_text.all() and all_drop.drop_ids.all()
    none = make_batch(samples, cfg_for(), np.random.default_rng(0))
    assert not none.drop_text.any() and not none.drop_ids.any()
    assert a.image.min() >= -1 and a.image.max() <= 1 and a.control.min() >= 0 and a.control.max() <= 1


def test_images_at_another_size_are_resized_with_their_boxes():
    b2 = make_batch([make_sample(2, 0, size=2 * R)], cfg_for(), np.random.default_rng(0))
    b1 = make_batch([make_sample(2, 0)], cfg_for(), np.random.default_rng(0))
    assert b2.image.shape == (1, 3, R, R)
    assert torch.equal(b2.masks, b1.masks)


def test_samples_without_local_features_are_refused():
    s = make_sample(2, 0)
    s.face_local = None
    with pytest.raises(ValueError, match="local face features"):
        make_batch([s], cfg_for(), np.random.default_rng(0))


# ---------------------------------------------------------------- the model (real ComfyUI, tiny set)

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny networks, one thread


@pytest.fixture(scope="module")
def tiny(comfyui, tmp_path_factory):
    from instantfamily_nodes.demo.tiny import build_tiny_models, register_tiny_model_type

    register_tiny_model_type()
    return build_tiny_models(tmp_path_factory.mktemp("tiny_train"))


def manifest() -> Manifest:
    return Manifest(face_encoder="insightface/antelopev2", L=L, d_gf=D_GF, d_lf=D_LF, resolution=R)


def build(tiny, **kw):
    from instantfamily_nodes.train.model import TrainModel

    cfg = cfg_for(checkpoint=str(tiny.root / "checkpoints" / tiny.checkpoint), **kw)
    return TrainModel.build(cfg, manifest(), "cpu")


@pytest.fixture(scope="module")
def model(tiny):
    return build(tiny)


@pytest.fixture(scope="module")
def batch():
    return make_batch([make_sample(2, 11), make_sample(3, 12)], cfg_for(), np.random.default_rng(3))


def test_only_projection_and_controlnet_train(model):
    from instantfamily_nodes.attention.layer import MaskedCrossAttention

    groups = model.param_groups()
    assert set(groups) == {"projection", "controlnet"}
    trainable = {id(p) for ps in groups.values() for p in ps}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.parameters()}          # UNet/VAE/CLIP are not in the tree
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert not model.unet.training
    # the same masked layer as the nodes in all 16 UNet and 7 ControlNet cross-attentions
    assert sum(isinstance(m, MaskedCrossAttention) for m in model.unet.modules()) == 16
    assert sum(isinstance(m, MaskedCrossAttention) for m in model.controlnet.modules()) == 7


def test_group_switches(tiny):
    m = build(tiny, train_controlnet=False)
    assert set(m.param_groups()) == {"projection"}
    assert not any(p.requires_grad for p in m.controlnet.parameters())
    assert all(p.requires_grad for p in m.projection.parameters())


def test_controlnet_starts_as_the_unets_encoder_with_zero_convs(model):
    unet_sd = model.unet.state_dict()
    copied = 0
    for name, p in model.controlnet.state_dict().items():
        if name.startswith(("zero_convs.", "middle_block_out.")):
            assert p.abs().sum() == 0, name
        elif name.startswith("input_hint_block."):
            continue
        else:
            assert torch.equal(p, unet_sd[name].float()), name
            copied += 1
    assert copied > 100
    convs = [m for m in model.controlnet.input_hint_block.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[-1].weight.abs().sum() == 0 and convs[0].weight.abs().sum() > 0


def test_loss_and_gradient_structure(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model.loss(batch, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    proj = [p.grad for p in model.projection.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in proj)
    assert model.projection.global_proj.weight.grad.abs().sum() > 0
    assert model.projection.local_proj.weight.grad.abs().sum() > 0
    cn = dict(model.controlnet.named_parameters())
    # step 0: the zero convs get gradient, everything behind them gets exactly none (ControlNet paper)
    assert all(cn[f"zero_convs.{i}.0.weight"].grad.abs().sum() > 0 for i in range(len(model.controlnet.zero_convs)))
    assert cn["middle_block_out.0.weight"].grad.abs().sum() > 0
    behind = [n for n in cn if not n.startswith(("zero_convs.", "middle_block_out."))]
    assert all(cn[n].grad is None or cn[n].grad.abs().sum() == 0 for n in behind)
    # once the zero convs are not zero, gradient reaches the ControlNet's inside and its attention
    saved = {n: p.detach().clone() for n, p in cn.items()}
    try:
        with torch.no_grad():
            for n, p in cn.items():
                if n.startswith(("zero_convs.", "middle_block_out.")) and n.endswith("weight"):
                    p.add_(1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        model.zero_grad(set_to_none=True)
        model.loss(batch, torch.Generator().manual_seed(0)).backward()
        assert cn["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].grad.abs().sum() > 0
        assert cn["input_hint_block.0.weight"].grad is not None
    finally:
        with torch.no_grad():
            for n, p in cn.items():
                p.copy_(saved[n])
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("net", ["unet", "controlnet"])
def test_an_ids_features_change_its_first_attention_output_only_inside_its_mask(model, batch, net):
    """Hard mode, measured at the first cross-attention of the UNet / ControlNet (its input does not
    depend on the IDs yet): perturbing the features of the ID in slot s changes that layer's output
    exactly nowhere outside mask s and somewhere inside it."""
    import torch.nn.functional as F

    root = model.unet if net == "unet" else model.controlnet
    layer = root.get_submodule("input_blocks.1.1.transformer_blocks.0.attn2")
    outs = []
    hook = layer.register_forward_hook(lambda _m, _i, o: outs.append(o.detach().clone()))
    b = 0
    slot = int(batch.id_present[b].nonzero()[0])
    try:
        with torch.no_grad():
            model.loss(batch, torch.Generator().manual_seed(0))
            changed = batch.to("cpu")
            changed.id_global = batch.id_global.clone()
            changed.id_global[b, slot] += 3.0
            model.loss(changed, torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    a, c = outs[0][b], outs[-1][b]                          # (h*w, C) at this layer's grid
    side = int(round(a.shape[0] ** 0.5))
    inside = F.interpolate(batch.masks[b:b + 1, slot:slot + 1], size=(side, side), mode="area").flatten() > 0
    diff = (a - c).abs().sum(-1)
    assert diff[~inside].max() == 0
    assert diff[inside].max() > 1e-4
    # the other sample of the batch is untouched
    assert torch.equal(outs[0][1], outs[-1][1])


def test_dropped_ids_are_the_null_identity_and_empty_slots_get_no_attention(model, batch):
    null = model.id_tokens(batch, torch.ones(batch.size, dtype=torch.bool))
    ref = model.projection.null_tokens(batch.id_present.shape[1], (batch.size,))
    torch.testing.assert_close(null, ref)
    from instantfamily_nodes.models.projection import stack_context

    _, layout = stack_context(torch.zeros(batch.size, 77, 768), null)
    binding = model.binding(batch, layout)
    assert torch.equal(binding.masks.strength, batch.id_present.float())


def test_trainable_state_round_trip_and_strict_errors(model):
    sd = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    assert all(k.startswith(("projection.", "controlnet.")) for k in sd)
    model.load_trainable_state_dict(sd)
    bad = dict(sd)
    bad.pop("projection.pos_row")
    with pytest.raises(KeyError, match="projection.pos_row"):
        model.load_trainable_state_dict(bad)
    bad = dict(sd)
    bad["controlnet.zero_convs.0.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="controlnet.zero_convs.0.0.weight"):
        model.load_trainable_state_dict(bad)


def test_sample_makes_pictures(model, batch):
    img = model.sample(batch, steps=2, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert img.shape == (batch.size, 3, R, R) and torch.isfinite(img).all()
    assert img.min() >= 0 and img.max() <= 1


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny, model, batch):
    ck = build(tiny, gradient_checkpointing=True)
    ck.load_trainable_state_dict(model.trainable_state_dict())
    with torch.no_grad():  # nonzero zero convs, so the ControlNet's inside gets gradient too
        for m in (model, ck):
            for i, zc in enumerate(m.controlnet.zero_convs):
                zc[0].weight.copy_(torch.full_like(zc[0].weight, 1e-2))
    grads = []
    for m in (model, ck):
        m.zero_grad(set_to_none=True)
        loss = m.loss(batch, torch.Generator().manual_seed(4))
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys()
    for n in grads[0][1]:
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n], rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        for zc in model.controlnet.zero_convs:
            zc[0].weight.zero_()
    model.zero_grad(set_to_none=True)


def test_thirty_steps_overfit_a_fixed_batch(tiny, batch):
    m = build(tiny)
    opt = torch.optim.AdamW([{"params": ps, "lr": 1e-3} for ps in m.param_groups().values()], weight_decay=0.0)
    losses = []
    for _ in range(32):
        opt.zero_grad(set_to_none=True)
        loss = m.loss(batch, torch.Generator().manual_seed(0))    # same t and noise: a fixed target
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.5 * losses[0], losses


def test_controlnet_init_from_a_file_and_refusals(tiny, tmp_path):
    from safetensors.torch import load_file

    from instantfamily_nodes.train.model import ModelSetupError

    path = tiny.root / "controlnet" / tiny.controlnet
    m = build(tiny, controlnet_init=str(path))
    ref = load_file(str(path))
    for k, v in m.controlnet.state_dict().items():
        assert torch.equal(v, ref[k].float()), k
    from instantfamily_nodes.train.model import TrainModel

    # a file that is not an SD1.5 checkpoint (a ControlNet) given as the checkpoint
    with pytest.raises(ModelSetupError, match="checkpoint"):
        TrainModel.build(cfg_for(checkpoint=str(path)), manifest(), "cpu")
    # a ControlNet with another shape than the checkpoint's UNet
    import comfy.cldm.cldm
    import comfy.ops
    from safetensors.torch import save_file

    from instantfamily_nodes.demo import tiny as tiny_mod

    cfg = {k: v for k, v in tiny_mod.UNET_CONFIG.items() if k != "out_channels"}
    cfg["channel_mult"] = [1, 2, 4, 4]
    net = comfy.cldm.cldm.ControlNet(**cfg, **tiny_mod.UNET_EXTRA, hint_channels=3, device="cpu",
                                     operations=comfy.ops.disable_weight_init, dtype=torch.float32)
    tiny_mod.init_weights(net, 0)
    other = tmp_path / "other_controlnet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(other))
    with pytest.raises(ModelSetupError, match=r"controlnet_init: .* input_blocks\.\S+ is \(\d+.*\) in the "
                       r"ControlNet but \(\d+.*\) in the UNet"):
        build(tiny, controlnet_init=str(other))
    pickled = tmp_path / "x.ckpt"
    pickled.write_bytes(b"0")
    with pytest.raises(ModelSetupError, match="not a .safetensors"):
        build(tiny, controlnet_init=str(pickled))
    bad = manifest()
    bad.L, bad.d_lf = 0, 0
    with pytest.raises(ModelSetupError, match="local"):
        TrainModel.build(cfg_for(checkpoint=str(tiny.root / "checkpoints" / tiny.checkpoint)), bad, "cpu")


def test_loss_depends_only_on_the_generator_for_its_randomness(model, batch):
    with torch.no_grad():
        a = model.loss(batch, torch.Generator().manual_seed(9))
        torch.manual_seed(123)   # the global RNG must not matter
        b = model.loss(batch, torch.Generator().manual_seed(9))
        c = model.loss(batch, torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_paper_mode_trains_too(tiny, batch):
    m = build(tiny, attention_mode="paper")
    loss = m.loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert m.projection.local_proj.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in m.projection.parameters())


def test_dropped_captions_become_the_empty_prompt(model, batch):
    import comfy.sd  # noqa: F401  (the model's CLIP is ComfyUI's)

    drop = torch.tensor([True, False])
    text = model.encode_text(batch, drop)
    empty = model.clip.encode_from_tokens(model.clip.tokenize("")).float()[0]
    caption = model.clip.encode_from_tokens(model.clip.tokenize(batch.caption[1])).float()[0]
    torch.testing.assert_close(text[0], empty)
    torch.testing.assert_close(text[1], caption)
    assert not torch.allclose(empty, caption)


def test_cached_latents_and_text_give_the_same_loss_as_encoding_on_the_fly(model, batch):
    """Shards with prepare's caches (latent as ComfyUI's VAE Encode returns it, text as CLIP gives it)
    must train exactly like encoding the image and caption in the step."""
    from dataclasses import replace

    raw = model.vae.encode(((batch.image + 1) / 2).movedim(1, -1))
    text = torch.stack([model.clip.encode_from_tokens(model.clip.tokenize(c)).float()[0] for c in batch.caption])
    cached = replace(batch, latent=raw, text_embedding=text)
    with torch.no_grad():
        a = model.loss(batch, torch.Generator().manual_seed(2))
        b = model.loss(cached, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the latent is in the UNet's scale: ComfyUI's SD1.5 format multiplies by 0.18215
    torch.testing.assert_close(model.encode_latents(cached), raw * 0.18215)


def _step_recorded(m, batch, seed: int = 4):
    """One real loss step of ``m`` with its UNet output recorded: (loss, output, z0, noise, a_t), all but the
    loss in float64; the noise is recovered from the recorded z_t, independently of the loss code."""
    seen = {}
    predict = m.predict_noise

    def record(z_t, t, *args, **kwargs):
        seen["z_t"], seen["t"] = z_t.detach().clone(), t.detach().clone()
        seen["out"] = predict(z_t, t, *args, **kwargs)
        return seen["out"]

    m.predict_noise = record
    try:
        with torch.no_grad():
            loss = m.loss(batch, torch.Generator().manual_seed(seed))
            z0 = m.encode_latents(batch).double()
    finally:
        m.predict_noise = predict
    a = m.alphas_cumprod[seen["t"]].double().view(-1, 1, 1, 1)
    noise = (seen["z_t"].double() - a.sqrt() * z0) / (1 - a).sqrt()
    return loss, seen["out"].double(), z0, noise, a


def test_face_loss_weight_weighs_the_noise_error_inside_the_id_masks(tiny, batch):
    """The step's loss with face_loss_weight = 3 equals a float64 hand computation on the noise it
    predicted (recorded from the real predict_noise): latent pixels inside a present ID's mask count 4x."""
    m = build(tiny, face_loss_weight=3.0)
    loss, out, _, noise, _ = _step_recorded(m, batch)
    err = (out - noise) ** 2                                           # (B, C, r, r)
    present = batch.masks.double() * batch.id_present.double()[..., None, None]
    union = present.amax(1)                                            # (B, R, R)
    b, r = union.shape[0], err.shape[-1]
    k = union.shape[-1] // r
    face = union.view(b, r, k, r, k).mean((2, 4))                      # block means: the latent pixel's share
    assert 0 < float(face.sum()) < face.numel()                       # faces and background both present
    weight = (1 + 3.0 * face)[:, None].expand_as(err)
    expected = (weight * err).sum() / weight.sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    assert float(loss) != pytest.approx(float(err.mean()), rel=1e-3)  # and it is not the plain MSE


def test_a_v_prediction_checkpoint_trains_on_v(tiny, batch, tmp_path):
    """A checkpoint ComfyUI loads as v-prediction (its top-level ``v_pred`` key) is trained on
    v = sqrt(a) eps - sqrt(1-a) z0: the step's loss equals a float64 hand computation of that MSE from the
    UNet output recorded in the real step, and is not the eps-MSE of the same output."""
    from safetensors.torch import load_file, save_file

    src = tiny.root / "checkpoints" / tiny.checkpoint
    sd = load_file(str(src))
    sd["v_pred"] = torch.tensor([])
    v_path = tmp_path / "tiny_v.safetensors"
    save_file(sd, str(v_path))
    assert build(tiny).prediction == "eps"
    from instantfamily_nodes.train.model import TrainModel

    m = TrainModel.build(cfg_for(checkpoint=str(v_path)), manifest(), "cpu")
    assert m.prediction == "v"
    loss, out, z0, noise, a = _step_recorded(m, batch)
    v = a.sqrt() * noise - (1 - a).sqrt() * z0
    assert float(loss) == pytest.approx(float(((out - v) ** 2).mean()), rel=1e-4)
    assert float(loss) != pytest.approx(float(((out - noise) ** 2).mean()), rel=1e-2)
    img = m.sample(batch, steps=2, generator=torch.Generator().manual_seed(0))
    assert img.shape == (batch.size, 3, R, R) and torch.isfinite(img).all()


def test_bf16_on_cpu_matches_fp32_and_hands_the_layers_a_bf16_context(tiny, batch):
    """mixed_precision = bf16 on a CPU computes the fp32 step's loss and ControlNet gradients to bf16
    precision, and casts the context once before the UNet and ControlNet, so their 23 cross-attentions
    get it in bf16 instead of each casting its own copy for K and V (a sixth of a CPU step).

    Not compared: the gradients' directions. On this random tiny UNet the gradient through its encoder is
    chaotic in bf16 (norms 0.1x-10x of fp32 from one noise draw to the next). On AMD CPUs with avx512_bf16
    the ControlNet's to_k gradient still agreed (cosine > 0.95, asserted until 2026-12-07); on an Intel
    Xeon with AMX it did not (cosine 0.008 for to_k, -0.37 for to_v, -0.016 over the whole ControlNet),
    while a 64-channel world fit under bf16 on that same machine trained the README's best model. On the
    trained world base the comparison gave cosine 0.998-0.9999 for projection and ControlNet (2026-12-07)."""
    m32, mbf = build(tiny), build(tiny, mixed_precision="bf16")
    mbf.load_trainable_state_dict(m32.trainable_state_dict())
    with torch.no_grad():   # open the zero convs so the ControlNet and its attention are in the gradient path
        for m in (m32, mbf):
            for n, p in m.controlnet.named_parameters():
                if n.startswith(("zero_convs.", "middle_block_out.")) and n.endswith("weight"):
                    p.copy_(1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    seen = []
    hooks = [net.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["context"].dtype), with_kwargs=True)
             for net in (mbf.unet, mbf.controlnet)]
    try:
        steps = []
        for m in (m32, mbf):
            m.zero_grad(set_to_none=True)
            loss = m.loss(batch, torch.Generator().manual_seed(7))
            loss.backward()
            attn = m.controlnet.input_blocks[1][1].transformer_blocks[0].attn2
            grads = {"k": attn.to_k.weight.grad.flatten(), "v": attn.to_v.weight.grad.flatten()}
            steps.append((float(loss.detach()), grads, [p.grad for p in m.projection.parameters()]))
    finally:
        for h in hooks:
            h.remove()
    assert seen == [torch.bfloat16, torch.bfloat16]
    (l32, g32, _), (lbf, gbf, proj_bf) = steps
    assert lbf == pytest.approx(l32, rel=2e-2)
    assert g32["k"].abs().sum() > 0
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in gbf.values())   # grads stay fp32
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in proj_bf)
