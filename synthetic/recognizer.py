"""The world's face recognition net, trained on the world and exported as an insightface-shaped pack.

The net is ArcFace-shaped (a 4x average pool, a stem, three residual stages, BatchNorm, flatten, fc,
BatchNorm1d: 112 x 112 RGB -> a 64-d embedding, with a 7 x 7 x 128 last feature map, or 4 x 4 with
``map_side=4``: 17 tokens per ID instead of 50, a cheaper fit), trained with a
CosFace loss on aligned crops of world faces: the same crops the pack makes at inference (insightface's
``norm_crop`` from the detector's 5 keypoints), with keypoint, blur and noise augmentation so it also
reads faces a diffusion model drew. Classification = the largest cosine between the embedding and the
class weights (``classes`` in ``world.safetensors``).

Exported pack (``<root>/models/<name>/``, loaded by ``models.faces.InsightFaceEncoder`` unchanged):
``world_det.onnx`` (:mod:`.detector`), ``world_rec.onnx`` (the net), ``world.safetensors`` (class
weights + metadata: seed, identities, held-out accuracy).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .world import World

logger = logging.getLogger("instantfamily.synthetic")

DEFAULT_PACK = "synthetic_world"
REC_FILE = "world_rec.onnx"
DET_FILE = "world_det.onnx"
META_FILE = "world.safetensors"
CROP = 112
MAP_SIDES = (7, 4)     # the last feature map's side: the last stage keeps 7 x 7 or halves it to 4 x 4
COSFACE_SCALE, COSFACE_MARGIN = 16.0, 0.2


def _net(width: int = 16, emb_dim: int = 64, map_side: int = 7):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int = 2) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.act = nn.PReLU(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = nn.Conv2d(cin, cout, 1, stride, bias=False)

        def forward(self, x):
            return self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))) + self.down(x)

    class WorldArcFace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c = width
            # The world's faces are 8-60 px, so the 112-px crop is first averaged down to 28 px: the net
            # costs ~17 MMAC a face and trains in minutes on a shared CPU.
            self.stem = nn.Sequential(nn.AvgPool2d(4), nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c),
                                      nn.PReLU(c))
            last_stride = {7: 1, 4: 2}[map_side]      # 7 x 7 -> 4 x 4 (3x3 conv, padding 1)
            self.layers = nn.Sequential(Block(c, c * 2), Block(c * 2, c * 4), Block(c * 4, c * 8, stride=last_stride))
            self.bn2 = nn.BatchNorm2d(c * 8)          # its output is the local map onnx_local exposes
            self.dropout = nn.Dropout(0.1)
            self.fc = nn.Linear(c * 8 * map_side ** 2, emb_dim)      # 7 x 7 (or 4 x 4) x 128 -> 64
            self.features = nn.BatchNorm1d(emb_dim)

        def forward(self, x):
            x = self.bn2(self.layers(self.stem(x)))
            return self.features(self.fc(self.dropout(torch.flatten(x, 1))))

    return WorldArcFace()


def aligned_crops(image: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """insightface's ArcFace alignment, exactly what the pack does at inference."""
    from insightface.utils import face_align

    return np.stack([face_align.norm_crop(image, landmark=k.astype(np.float32), image_size=CROP) for k in kps])


def _fast_crop(image: np.ndarray, box: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """The aligned crop of a world face box, with detector-like error when ``rng`` is given.

    World keypoints are ArcFace's template on the box-height square (:func:`.world.face_kps`), so
    ``norm_crop``'s similarity transform is exactly "that square onto 112 x 112"; building it directly
    is ~10x faster than insightface's estimate. The test checks it equals ``aligned_crops``."""
    import cv2

    x0, y0, x1, y1 = (float(v) for v in box)
    side = y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if rng is not None:
        side *= rng.uniform(0.94, 1.06)
        cx, cy = cx + rng.normal(0, 0.03 * side), cy + rng.normal(0, 0.03 * side)
    a = CROP / side
    m = np.array([[a, 0, CROP / 2 - a * cx], [0, a, CROP / 2 - a * cy]], np.float32)
    return cv2.warpAffine(image, m, (CROP, CROP), borderValue=0.0)


def _degrade(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a generated face may look like: blurred, noisy, colour-shifted (half the crops stay clean)."""
    import cv2

    if rng.random() < 0.5:
        return crop
    out = crop.astype(np.float32)
    if rng.random() < 0.7:
        k = int(rng.choice([3, 5, 7, 9]))
        out = cv2.GaussianBlur(out, (k, k), 0)
    out = out * rng.uniform(0.8, 1.15) + rng.uniform(-15, 15, size=3) + rng.normal(0, rng.uniform(0, 10), out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def face_dataset(world: World, count: int, split: str, seed: int = 0, augment: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
    """About ``count`` aligned crops (N, 112, 112, 3) uint8 with identity labels, from world scenes of
    1-7 people at canvas sizes 96-256 (faces of 8-60 px), like the pack would crop them."""
    rng = np.random.default_rng([seed, 17])
    crops, labels = [], []
    i = 0
    while len(labels) < count:
        n = int(rng.integers(1, 8))
        side = int(rng.choice([96, 128, 160, 192, 256]))
        hw = (side, side) if rng.random() < 0.7 else (side, int(side * 1.5))
        try:
            scene = world.scene(n, hw, split=split, index=seed * 1_000_003 + i)
        except ValueError:          # canvas too small for that many people
            i += 1
            continue
        i += 1
        for box, label in zip(scene.boxes, scene.identities):
            crop = _fast_crop(scene.image, box, rng if augment else None)
            crops.append(_degrade(crop, rng) if augment else crop)
            labels.append(label)
    return np.stack(crops[:count]), np.array(labels[:count], np.int64)


@dataclass
class TrainedRecognizer:
    net: object                 # the torch module (eval mode)
    classes: np.ndarray         # (K, emb_dim) float32, L2-normalised class weights
    heldout_accuracy: float
    seconds: float
    map_side: int = 7           # side of the net's last feature map


def train_recognizer(world: World, steps: int = 600, batch: int = 64, train_size: int = 12000,
                     test_size: int = 2000, seed: int = 0, threads: int | None = None,
                     log_every: int = 100, map_side: int = 7) -> TrainedRecognizer:
    """CosFace training on world crops (train split); accuracy on held-out appearances (test split).
    ``map_side`` (7 or 4) is the side of the last feature map: the ID tokens per face are its square + 1."""
    import torch
    from torch.nn import functional as F

    if map_side not in MAP_SIDES:
        raise ValueError(f"map_side = {map_side}: use one of {MAP_SIDES}")
    if threads:
        torch.set_num_threads(int(threads))
    t0 = time.time()
    torch.manual_seed(seed)
    x_np, y_np = face_dataset(world, train_size, "recognizer", seed=seed)
    x = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()      # uint8, normalised per batch
    y = torch.from_numpy(y_np)
    net = _net(map_side=map_side)
    k = len(world)
    w = torch.nn.Parameter(torch.randn(k, 64) * 0.1)
    opt = torch.optim.AdamW(list(net.parameters()) + [w], lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        xb = (x[idx].float() - 127.5) / 127.5
        emb = F.normalize(net(xb), dim=1)
        cos = emb @ F.normalize(w, dim=1).T
        logits = COSFACE_SCALE * (cos - COSFACE_MARGIN * F.one_hot(y[idx], k))
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            logger.info("recognizer step %d/%d loss %.3f", step + 1, steps, loss.item())
    net.eval()
    classes = F.normalize(w.detach(), dim=1).numpy().astype(np.float32)
    xt, yt = face_dataset(world, test_size, "test", seed=seed + 1, augment=False)
    acc = float((classify(embed(net, xt), classes) == yt).mean())
    return TrainedRecognizer(net=net, classes=classes, heldout_accuracy=acc, seconds=time.time() - t0,
                             map_side=map_side)


def embed(net, crops: np.ndarray, batch: int = 256) -> np.ndarray:
    """Embeddings of aligned RGB crops with the torch net (the ONNX export gives the same)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(crops), batch):
            xb = torch.from_numpy(np.ascontiguousarray(crops[i:i + batch])).permute(0, 3, 1, 2).float()
            out.append(net((xb - 127.5) / 127.5).numpy())
    return np.concatenate(out) if out else np.zeros((0, 64), np.float32)


def classify(embeddings: np.ndarray, classes: np.ndarray, among: list[int] | None = None) -> np.ndarray:
    """Identity per embedding: the class with the largest cosine, optionally only ``among`` some identities."""
    e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    cos = e @ classes.T
    if among is not None:
        mask = np.full(cos.shape[1], -np.inf, np.float32)
        mask[list(among)] = 0.0
        cos = cos + mask
    return cos.argmax(1)


def export_pack(trained: TrainedRecognizer, world: World, root: str | os.PathLike, name: str = DEFAULT_PACK) -> Path:
    """``<root>/models/<name>/``: detector + recognizer ONNX and the class weights; returns the folder."""
    import warnings

    import torch
    from safetensors.numpy import save_file

    from .detector import export_world_detector

    folder = Path(root) / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    export_world_detector(folder / DET_FILE)
    tmp = folder / (REC_FILE + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(trained.net, torch.zeros(1, 3, CROP, CROP), str(tmp), opset_version=17, dynamo=False,
                          input_names=["input.1"], output_names=["embedding"],
                          dynamic_axes={"input.1": {0: "N"}, "embedding": {0: "N"}})
    os.replace(tmp, folder / REC_FILE)
    meta = {"format": "instantfamily-synthetic-world", "seed": str(world.seed), "identities": str(len(world)),
            "heldout_accuracy": f"{trained.heldout_accuracy:.4f}", "train_seconds": f"{trained.seconds:.0f}",
            "map_side": str(trained.map_side)}
    save_file({"classes": trained.classes}, str(folder / META_FILE), metadata=meta)
    return folder


def load_classes(pack_dir: str | os.PathLike) -> tuple[np.ndarray, dict[str, str]]:
    """The class weights and metadata of an exported world pack."""
    from safetensors import safe_open

    path = Path(pack_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a synthetic-world face pack; build one with "
                                "`python -m instantfamily_nodes.synthetic recognizer --out DIR`")
    with safe_open(str(path), framework="numpy") as f:
        return f.get_tensor("classes"), dict(f.metadata() or {})


def pack_summary(folder: Path) -> str:
    classes, meta = load_classes(folder)
    return json.dumps({"folder": str(folder), **meta, "classes_shape": list(classes.shape)})
