"""Small insightface-shaped ONNX models built on the spot, for tests, the benchmark and CPU demos.

No insightface pack can be downloaded here, so these stand in for antelopev2's files: an ArcFace-shaped
recognition net (iresnet layout: conv stages, a residual Add, BatchNorm, flatten, fc, BatchNorm1d) and an
SCRFD-shaped detector (9 outputs: scores, box distances and keypoints for strides 8/16/32, 2 anchors)
that "detects" bright squares. Random weights: no identity power. Needs torch.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _torch():
    import torch

    return torch


def _export(module, example, path, **kwargs) -> None:
    """torch's TorchScript ONNX exporter (no onnxscript needed), its deprecation chatter silenced."""
    import warnings

    torch = _torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # the detector's strided anchor sampling cannot be constant-folded; harmless
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(module, example, str(path), opset_version=17, dynamo=False, **kwargs)


def arcface_like(width: int = 16, emb_dim: int = 64, input_size: int = 112, seed: int = 0):
    """torch module: 112x112 RGB -> embedding; ``.bn2`` output is the (width*8) x 7 x 7 local map."""
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.act = nn.PReLU(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.down = nn.Conv2d(cin, cout, 1, 2, bias=False)

        def forward(self, x):
            return self.conv2(self.act(self.bn1(self.conv1(x)))) + self.down(x)

    class ArcFaceLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c = width
            self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.PReLU(c))
            self.layers = nn.Sequential(Block(c, c * 2), Block(c * 2, c * 4), Block(c * 4, c * 8), Block(c * 8, c * 8))
            self.bn2 = nn.BatchNorm2d(c * 8)
            self.fc = nn.Linear(c * 8 * (input_size // 16) ** 2, emb_dim)
            self.features = nn.BatchNorm1d(emb_dim)

        def forward(self, x):
            x = self.bn2(self.layers(self.stem(x)))
            return self.features(self.fc(torch.flatten(x, 1)))

    net = ArcFaceLike()
    with torch.no_grad():  # non-trivial BN statistics so folding mistakes would show
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return net.eval()


def export_arcface_like(path: str | os.PathLike, width: int = 16, emb_dim: int = 64, seed: int = 0):
    """Write an ArcFace-shaped recognition ONNX (dynamic batch, like insightface's); returns the torch net."""
    torch = _torch()
    net = arcface_like(width, emb_dim, seed=seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _export(net, torch.zeros(1, 3, 112, 112), path, input_names=["input.1"], output_names=["embedding"],
            dynamic_axes={"input.1": {0: "N"}, "embedding": {0: "N"}})
    return net


# Where the five keypoints sit in a synthetic face, as fractions of its box from the box centre
# (x of width, y of height): eyes, nose, mouth corners.
SQUARE_FACE_KPS = ((-0.2, -0.1), (0.2, -0.1), (0.0, 0.1), (-0.15, 0.25), (0.15, 0.25))
SQUARE_REACH = 320   # the largest distance (detector-input px) from an anchor to a square's edge


def export_scrfd_like(path: str | os.PathLike) -> None:
    """Write an SCRFD-shaped detector ONNX whose boxes frame bright squares exactly.

    A face is a bright square (gray > 0.8) holding at least one point of the stride-32 anchor grid
    (a square of 32 px or more always does). For each anchor inside a square the net counts the bright
    pixels from the anchor to the square's four edges along its row and column (box pooling over a
    ``SQUARE_REACH`` window), which are SCRFD's four box distances: every anchor of one square decodes to
    the same box, the square itself, and insightface's NMS keeps one. Keypoints are placed in that box at
    ``SQUARE_FACE_KPS``. Only stride 32 fires. insightface's own SCRFD code decodes it like the real model."""
    torch = _torch()
    nn = torch.nn
    F = nn.functional
    R = SQUARE_REACH

    def run_length(bright, s: int, dim: int, before: bool):
        # Bright pixels in [a - R, a) (before) or [a, a + R) (after) of each anchor a = k*s along ``dim``
        # (3: x, 2: y), sampled on the anchor rows/columns. Input sides are multiples of s (det_size).
        kernel = (1, R) if dim == 3 else (R, 1)
        if dim == 3:
            x = F.pad(bright[..., :, :-1], (R, 0, 0, 0)) if before else F.pad(bright, (0, R - 1, 0, 0))
            return F.avg_pool2d(x[..., ::s, :], kernel, stride=(1, s)) * R
        x = F.pad(bright[..., :-1, :], (0, 0, R, 0)) if before else F.pad(bright, (0, 0, 0, R - 1))
        return F.avg_pool2d(x[..., :, ::s], kernel, stride=(s, 1)) * R

    class ScrfdLike(nn.Module):
        def forward(self, x):
            gray = x.mean(1, keepdim=True)                      # input is (pixel - 127.5) / 128
            bright = (gray > 0.8).float()
            outs_s, outs_b, outs_k = [], [], []
            for s in (8, 16, 32):
                inside = bright[..., ::s, ::s]                  # (1, 1, H/s, W/s): anchor (k*s, j*s)
                if s == 32:
                    left, right = run_length(bright, s, 3, True), run_length(bright, s, 3, False)
                    top, bottom = run_length(bright, s, 2, True), run_length(bright, s, 2, False)
                    score = inside
                else:
                    left = right = top = bottom = inside
                    score = inside * 0.0
                w, h = left + right, top + bottom
                cx, cy = (right - left) / 2, (bottom - top) / 2  # box centre relative to the anchor
                kps = []
                for fx, fy in SQUARE_FACE_KPS:
                    kps += [cx + fx * w, cy + fy * h]

                def cells(*maps):  # (1, 1, h, w) maps -> (h*w*2, len(maps)) in stride units, row-major
                    m = torch.cat(maps, 1).permute(0, 2, 3, 1) / float(s)
                    return torch.cat([m, m], 3).reshape(-1, len(maps))

                outs_s.append(cells(score) * float(s))
                outs_b.append(cells(left, top, right, bottom))
                outs_k.append(cells(*kps))
            return (*outs_s, *outs_b, *outs_k)

    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _export(ScrfdLike(), torch.zeros(1, 3, 640, 640), path, input_names=["input.1"], output_names=names,
            dynamic_axes={"input.1": {2: "H", 3: "W"}})


def make_model_pack(root: str | os.PathLike, name: str = "antelopev2", width: int = 16) -> Path:
    """``root/models/<name>/`` with an SCRFD-shaped detector and an ArcFace-shaped recognizer."""
    d = Path(root) / "models" / name
    export_scrfd_like(d / "scrfd_like_bnkps.onnx")
    export_arcface_like(d / "arcface_like.onnx", width=width)
    return d


def square_faces_image(centers: list[tuple[int, int]], size: int = 64, hw: tuple[int, int] = (480, 640)) -> np.ndarray:
    """Black RGB image with bright squares the SCRFD-shaped detector reports as faces."""
    img = np.zeros((*hw, 3), np.uint8)
    for cx, cy in centers:
        img[max(cy - size // 2, 0): cy + size // 2, max(cx - size // 2, 0): cx + size // 2] = 255
    return img
