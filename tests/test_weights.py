"""The weight file: round trip, and a clear error for every way a file can be wrong."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from instantfamily_nodes.models import IDProjection, WeightFileError, WeightMeta, load_weights, save_weights

META = WeightMeta("insightface/antelopev2", L=7, d_gf=512, d_lf=512, d_k=768, attention_mode="hard", train_n_ids=4)


def write(tmp_path, tensors=None, metadata=None, name="w.safetensors"):
    path = tmp_path / name
    if tensors is None:
        tensors = {f"projection.{k}": v for k, v in IDProjection().state_dict().items()}
    save_file(tensors, str(path), metadata=META.to_metadata() if metadata is None else metadata)
    return path


def test_round_trip(tmp_path):
    proj = IDProjection()
    save_weights(tmp_path / "w.safetensors", META, proj, extra={"controlnet.x": torch.ones(2)})
    wf = load_weights(tmp_path / "w.safetensors", expect={"face_encoder": "insightface/antelopev2", "d_k": 768})
    assert wf.meta == META
    g, loc = torch.randn(2, 512), torch.randn(2, 7, 7, 512)
    assert torch.equal(wf.projection()(g, loc), proj.eval()(g, loc))
    assert torch.equal(wf.group("controlnet")["x"], torch.ones(2))


@pytest.mark.parametrize("field", ["face_encoder", "L", "d_gf", "d_lf", "d_k", "attention_mode", "train_n_ids", "format_version"])
def test_missing_metadata_field(tmp_path, field):
    md = META.to_metadata()
    del md[field]
    with pytest.raises(WeightFileError, match=f"metadata field '{field}' is missing; expected"):
        load_weights(write(tmp_path, metadata=md))


@pytest.mark.parametrize("field,value,match", [
    ("L", "seven", "metadata field 'L' is 'seven'; expected a positive integer"),
    ("d_k", "0", "metadata field 'd_k' is '0'"),
    ("attention_mode", "soft", "metadata field 'attention_mode' is 'soft'; expected one of"),
    ("format_version", "99", "format_version 99 is newer than this pack reads"),
    ("format", "diffusers", "not an InstantFamily weight file"),
])
def test_bad_metadata_value(tmp_path, field, value, match):
    md = META.to_metadata()
    md[field] = value
    with pytest.raises(WeightFileError, match=match):
        load_weights(write(tmp_path, metadata=md))


def test_missing_tensor(tmp_path):
    tensors = {f"projection.{k}": v for k, v in IDProjection().state_dict().items()}
    del tensors["projection.local_proj.weight"]
    with pytest.raises(WeightFileError, match=r"tensor 'projection.local_proj.weight' is missing; expected shape \(768, 512\)"):
        load_weights(write(tmp_path, tensors))


def test_misshapen_tensor(tmp_path):
    tensors = {f"projection.{k}": v for k, v in IDProjection().state_dict().items()}
    tensors["projection.pos_row"] = torch.zeros(8, 1, 768)
    with pytest.raises(WeightFileError, match=r"'projection.pos_row' has shape \(8, 1, 768\); expected \(7, 1, 768\) for L=7"):
        load_weights(write(tmp_path, tensors))


def test_unknown_tensors(tmp_path):
    tensors = {f"projection.{k}": v for k, v in IDProjection().state_dict().items()}
    tensors["unet.conv.weight"] = torch.zeros(1)
    with pytest.raises(WeightFileError, match="unexpected tensors"):
        load_weights(write(tmp_path, tensors))


def test_built_for_another_setup(tmp_path):
    path = write(tmp_path)
    with pytest.raises(WeightFileError, match="built for d_k=768, but this setup has d_k=1024"):
        load_weights(path, expect={"d_k": 1024})
    with pytest.raises(WeightFileError, match="built for face_encoder='insightface/antelopev2'"):
        load_weights(path, expect={"face_encoder": "dlib"})


class _Boom:
    def __reduce__(self):
        return (open, ("/tmp/instantfamily_pwned", "w"))


def test_pickles_are_never_unpickled(tmp_path):
    marker = Path("/tmp/instantfamily_pwned")
    marker.unlink(missing_ok=True)
    pt = tmp_path / "evil.pt"
    pt.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(WeightFileError, match="only .safetensors weight files are loaded"):
        load_weights(pt)
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(WeightFileError, match="not a readable safetensors file"):
        load_weights(disguised)
    assert not marker.exists()


def test_missing_file(tmp_path):
    with pytest.raises(WeightFileError, match="no such file; put InstantFamily weights in models/instantfamily"):
        load_weights(tmp_path / "nope.safetensors")
