"""Test shards for the trainer tests, written with the shard format's own encoder + webdataset's TarWriter
(independent of train/prepare.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from instantfamily_nodes.train.shards import Manifest, Sample, encode_sample

R = 64                          # training resolution of the trainer tests
D_GF, L, D_LF = 64, 7, 128      # the tiny set's synthetic face pack widths (demo/tiny.py)


def make_sample(key: str, n_faces: int, seed: int, res: int = R) -> Sample:
    """A picture with ``n_faces`` face boxes in a row and a simple skeleton under each; the image is a
    smooth colour field + a bright square per face (something a tiny model can learn)."""
    rng = np.random.default_rng(seed)
    step = res // max(4, n_faces)
    boxes = np.array([[2 + step * j, res // 10, step - 2 + step * j, res // 10 + step - 4]
                      for j in range(n_faces)], np.float32)
    pose = np.zeros((n_faces, 18, 3), np.float32)
    for j in range(n_faces):
        cx = float(boxes[j, 0] + boxes[j, 2]) / 2
        pose[j, 0] = [cx, float(boxes[j, 1] + boxes[j, 3]) / 2, 1]
        pose[j, 1] = [cx, res * 0.5, 1]
        pose[j, 2] = [cx - 3, res * 0.55, 1]
        pose[j, 5] = [cx + 3, res * 0.55, 1]
    yy, xx = np.mgrid[0:res, 0:res] / res
    base = rng.uniform(0.2, 0.8, 3)
    img = np.stack([base[c] + 0.2 * np.sin(3 * xx + c) * np.cos(2 * yy) for c in range(3)], -1)
    for b in boxes.astype(int):
        img[b[1]:b[3], b[0]:b[2]] = rng.uniform(0.6, 1.0, 3)
    image = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return Sample(key=key, image=image, caption=f"a photo of {n_faces} people",
                  face_boxes=boxes, face_kps=np.zeros((n_faces, 5, 2), np.float32),
                  face_embedding=rng.standard_normal((n_faces, D_GF)).astype(np.float32),
                  face_local=rng.standard_normal((n_faces, L, L, D_LF)).astype(np.float32),
                  pose=pose, face_person=list(range(n_faces)), source=f"{key}.png")


def write_shards(folder: Path, n_shards: int, per_shard: int, seed: int = 0, res: int = R) -> Manifest:
    """``n_shards`` tar shards of ``per_shard`` samples each (1-5 faces) + manifest.json."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(face_encoder="insightface/antelopev2", L=L, d_gf=D_GF, d_lf=D_LF, resolution=res)
    k = 0
    for s in range(n_shards):
        name = f"shard-{s:05d}.tar"
        with wds.TarWriter(str(folder / name)) as w:
            for _ in range(per_shard):
                w.write(encode_sample(make_sample(f"s{k:06d}", 1 + k % 5, seed * 100_000 + k, res), "png"))
                k += 1
        manifest.shards[name] = per_shard
    manifest.save(folder)
    return manifest


def shard_keys(folder: Path) -> list[str]:
    """Every sample key in the shards, by reading the tars directly (an independent reference)."""
    import tarfile

    keys = []
    for p in sorted(folder.glob("*.tar")):
        with tarfile.open(p) as t:
            keys += sorted({m.name.split(".", 1)[0] for m in t.getmembers()})
    return keys


def ddp_worker(rank: int, world: int, port: int, comfyui: str, cfg_dict: dict, steps: int, out_file: str) -> None:
    """One process of the 2-process gloo DDP test (torch.multiprocessing.spawn target): ``steps`` optimizer
    steps through the trainer's own step function, rank 0 saves the trained tensors."""
    import os
    import sys

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sys.path.insert(0, comfyui)
        from safetensors.torch import save_file

        from instantfamily_nodes.train import fit as F
        from instantfamily_nodes.train.config import TrainConfig
        from instantfamily_nodes.train.data import open_stream
        from instantfamily_nodes.train.model import TrainModel

        cfg = TrainConfig.from_dict(cfg_dict)
        dev = torch.device("cpu")
        F.setup_comfy(cfg, dev)
        model = TrainModel.build(cfg, Manifest.load(cfg.data), dev)
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        groups = model.param_groups()
        opt = F.build_optimizer(cfg, groups)
        sched = F.build_scheduler(cfg, opt)
        dist = F.Dist(rank, world, 0, dev)
        stream = open_stream(cfg, rank, world, 0, collate=F.Collate(cfg))
        for step in range(steps):
            item = next(stream)
            F.train_step(ddp, model, opt, sched, None, groups, [(item.batch, F.loss_generator(cfg, rank, step, 0, dev))],
                         cfg, dist, step)
        if rank == 0:  # the trained tensors and the last step's (all-reduced) gradients
            out = {k: v.contiguous() for k, v in model.trainable_state_dict().items()}
            out.update({f"grad.{n}": p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None})
            save_file(out, out_file)
    finally:
        torch.distributed.destroy_process_group()
