"""The training loop end to end on CPU: real ComfyUI model code, the tiny SD1.5-shaped set (demo/tiny.py),
WebDataset shards written with the shard format's encoder (tests/train_data.py).

- the data stream: every sample once per epoch across ranks and workers (checked against the tar listing),
  a resumed stream continues exactly, a truncated shard is skipped and reported;
- fit: the loss on fixed held-out noise goes down, logs/TensorBoard/validation grid written;
- SIGTERM and --max-steps stops, then resume: bit-identical trainable tensors and optimizer state to an
  uninterrupted run; resume with another config names the keys;
- the first non-finite loss / gradient stops with the step and the parameter group;
- 2-process gloo DDP equals 1 process accumulating the same two micro-batches (fp32 tolerance);
- the CLI under torchrun (2 processes) writes checkpoints and the log; a resume with another config or
  another process count is refused before any model loads.
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from instantfamily_nodes.train import fit as F
from instantfamily_nodes.train.checkpoint import load_checkpoint
from instantfamily_nodes.train.config import TrainConfig
from instantfamily_nodes.train.data import open_stream
from instantfamily_nodes.train.shards import Manifest, ShardError

sys.path.insert(0, str(Path(__file__).parent))
from train_data import R, ddp_worker, shard_keys, write_shards  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny networks, one thread


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    write_shards(d, n_shards=4, per_shard=6)
    return d


@pytest.fixture(scope="module")
def tiny(comfyui, tmp_path_factory):
    from instantfamily_nodes.demo.tiny import build_tiny_models, register_tiny_model_type

    register_tiny_model_type()
    return build_tiny_models(tmp_path_factory.mktemp("tiny_fit"))


def cfg_for(data: Path, out: Path, tiny=None, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), resolution=R, batch_size=2, steps=10, num_workers=0,
                checkpoint_every=1000, log_every=1, validate_every=0, lr_projection=1e-3, lr_controlnet=1e-3,
                text_dropout=0.1, id_dropout=0.1, shuffle_buffer=4)
    if tiny is not None:
        base["checkpoint"] = str(tiny.root / "checkpoints" / tiny.checkpoint)
    base.update(kw)
    return TrainConfig(**base).validate()


def batch_keys(stream, n: int) -> list[tuple[int, list[str]]]:
    return [(it.index, [s.key for s in it.batch]) for it in (next(stream) for _ in range(n))]


# ---------------------------------------------------------------- the data stream (no model)

def test_each_epoch_covers_every_sample_once_across_ranks_and_workers(data, tmp_path):
    cfg = cfg_for(data, tmp_path, num_workers=2)
    seen = []
    for rank in (0, 1):
        # 24 samples / (2 ranks x 2 workers) = 6 per worker = 3 batches: 6 batches per rank is one epoch
        got = batch_keys(open_stream(cfg, rank, 2), 6)
        assert [i for i, _ in got] == list(range(6))
        seen += [k for _, ks in got for k in ks]
    assert sorted(seen) == shard_keys(data)
    # epoch 1 of a rank: 12 distinct samples again (the shards are re-dealt per epoch)
    again = batch_keys(open_stream(cfg, 0, 2, start_batch=6), 6)
    assert [i for i, _ in again] == list(range(6, 12))
    assert len({k for _, ks in again for k in ks}) == 12


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_exactly(data, tmp_path, workers):
    cfg = cfg_for(data, tmp_path, num_workers=workers)
    full = batch_keys(open_stream(cfg), 14)  # crosses into epoch 1
    for start in (3, 4, 11):
        assert batch_keys(open_stream(cfg, start_batch=start), 14 - start) == full[start:]


def test_a_truncated_shard_is_skipped_and_reported(data, tmp_path, caplog):
    d = tmp_path / "cut"
    shutil.copytree(data, d)
    victim = d / "shard-00001.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    cfg = cfg_for(d, tmp_path, num_workers=0, shuffle_buffer=1)
    stream = open_stream(cfg)
    keys, events = [], []
    with caplog.at_level("WARNING"):
        for _ in range(14):  # more than an epoch: the stream goes on after the damaged shard
            it = next(stream)
            keys += [s.key for s in it.batch]
            events += it.skipped
    assert events and all(e.shard == str(victim) for e in events)
    reasons = [e.reason for e in events]
    assert "ReadError: unexpected end of data" in reasons        # the cut, reported once per read
    assert reasons.count("ReadError: unexpected end of data") <= 2  # (14 batches read the shard at most twice)
    assert "shard-00001.tar" in caplog.text
    intact = set(shard_keys(data)[:6] + shard_keys(data)[12:])
    from_victim = {k for k in keys if k not in intact}
    assert intact <= set(keys)                        # every sample of the other shards was read
    assert 0 < len(from_victim) < 6                   # and the readable head of the cut one


def test_too_few_shards_for_the_workers(data, tmp_path):
    with pytest.raises(ShardError, match="lower num_workers"):
        open_stream(cfg_for(data, tmp_path, num_workers=3), rank=0, world=2)


# ---------------------------------------------------------------- fit (real model)

def fixed_loss(model, cfg: TrainConfig) -> float:
    """Mean loss over fixed batches and fixed noise (no dropout): the same measurement before and after."""
    from instantfamily_nodes.train.batch import make_batch
    from instantfamily_nodes.train.data import validation_samples

    c = TrainConfig.from_dict({**cfg.to_dict(), "text_dropout": 0.0, "id_dropout": 0.0, "validation_samples": 8})
    samples = validation_samples(c)
    total = 0.0
    with torch.no_grad():
        for i in range(0, 8, 2):
            b = make_batch(samples[i:i + 2], c, np.random.default_rng(i))
            for j in range(2):
                total += float(model.loss(b, torch.Generator().manual_seed(1000 * i + j)))
    return total / 8


def test_fit_lowers_the_loss_and_writes_logs_and_a_grid(tiny, data, tmp_path):
    from instantfamily_nodes.train.model import TrainModel

    cfg = cfg_for(data, tmp_path / "run", tiny, steps=32, validate_every=32, validation_samples=2,
                  validation_steps=2, checkpoint_every=16, keep_last=1, log_every=4)
    model = TrainModel.build(cfg, Manifest.load(cfg.data), "cpu")
    before = fixed_loss(model, cfg)
    res = F.fit(cfg, model=model, progress=False)
    after = fixed_loss(model, cfg)
    assert res.step == 32 and len(res.losses) == 32 and not res.stopped
    print(f"fixed-noise loss before {before:.4f}, after 32 steps {after:.4f}")
    assert after < 0.9 * before, (before, after)
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000000032"]   # keep_last=1
    rows = list(csv.DictReader(open(run / "logs" / "train.csv")))
    assert [int(r["step"]) for r in rows if r["loss"]] == [4, 8, 12, 16, 20, 24, 28, 32]
    for key in ("loss", "lr/projection", "lr/controlnet", "grad_norm/projection", "grad_norm/controlnet",
                "samples_per_s", "epoch"):
        assert all(float(r[key]) >= 0 for r in rows if r["loss"]), key
    assert float(rows[0]["lr/controlnet"]) == 1e-3
    assert list((run / "logs").glob("events.out.tfevents.*"))
    from PIL import Image

    grid = Image.open(run / "samples" / "step-000000032.png")
    assert grid.size == (3 * R, 2 * R)  # columns real | control | sample, one row per validation sample


def test_stop_and_resume_is_bit_identical(tiny, data, tmp_path, monkeypatch):
    from instantfamily_nodes.train.model import TrainModel

    def build(cfg):
        return TrainModel.build(cfg, Manifest.load(cfg.data), "cpu")

    # grad accumulation 2 with 2 loader workers: 3 batches per 1.5 steps, so the resume rotates the workers
    # the rate falls over the last half (steps 3-5), across the cut
    kw = dict(steps=5, grad_accum=2, num_workers=2, ema_decay=0.9, lr_warmup=3, lr_decay=0.5, checkpoint_every=2,
              keep_last=5)
    ref_cfg = cfg_for(data, tmp_path / "ref", tiny, **kw)
    ref = build(ref_cfg)
    F.fit(ref_cfg, model=ref, progress=False)

    cfg = cfg_for(data, tmp_path / "cut", tiny, **kw)
    real_gen = F.loss_generator

    def term_during_step_3(c, rank, step, micro, device):  # SIGTERM arrives mid-step: the step finishes first
        if step == 2 and micro == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_gen(c, rank, step, micro, device)
    monkeypatch.setattr(F, "loss_generator", term_during_step_3)
    first = F.fit(cfg, model=build(cfg), progress=False)
    assert first.step == 3 and first.stopped == "signal SIGTERM"
    monkeypatch.setattr(F, "loss_generator", real_gen)
    # --resume-from DIR (an explicit checkpoint folder), then --resume (the latest)
    second = F.fit(cfg, resume=str(tmp_path / "cut" / "checkpoints" / "step-000000003"), max_steps=1,
                   model=build(cfg), progress=False)
    assert second.step == 4 and "max_steps" in second.stopped
    m = build(cfg)
    third = F.fit(cfg, resume=True, model=m, progress=False)
    assert third.step == 5 and not third.stopped

    a, b = ref.trainable_state_dict(), m.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = load_checkpoint(tmp_path / "ref" / "checkpoints"), load_checkpoint(tmp_path / "cut" / "checkpoints")
    assert ca.step == cb.step == 5
    assert ca.optimizer_state["param_groups"] == cb.optimizer_state["param_groups"]
    for i, st in ca.optimizer_state["state"].items():
        for name, v in st.items():
            assert torch.equal(v, cb.optimizer_state["state"][i][name]), (i, name)
    assert all(torch.equal(ca.ema_state[k], cb.ema_state[k]) for k in ca.ema_state)
    assert ca.scheduler_state == cb.scheduler_state
    assert ca.data_position == cb.data_position == {"next_batch": 10, "world": 1, "roles": 2,
                                                    "samples_per_rank": 20, "batch_size": 2}
    # the resumed run's CSV has each step once
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "cut" / "logs" / "train.csv"))]
    assert steps == [1, 2, 3, 4, 5]

    # resuming with a config that changes the computation: a clear error naming the keys, before any build
    other = cfg_for(data, tmp_path / "cut", tiny, **{**kw, "lr_controlnet": 2e-3, "batch_size": 4, "steps": 9})
    with pytest.raises(F.ResumeError) as e:
        F.fit(other, resume=True, progress=False)
    assert "['batch_size', 'lr_controlnet']" in str(e.value) and "0.001 -> 0.002" in str(e.value)
    # and a fresh start into a folder that holds a run is refused (it would mix the two runs' checkpoints)
    with pytest.raises(F.ResumeError, match="already holds a run .*pass --resume"):
        F.fit(cfg, progress=False)


def test_non_finite_loss_or_gradient_stops_naming_step_and_group(tiny, data, tmp_path):
    from instantfamily_nodes.train.model import TrainModel

    cfg = cfg_for(data, tmp_path / "nan", tiny, steps=3)
    model = TrainModel.build(cfg, Manifest.load(cfg.data), "cpu")
    p = next(model.controlnet.parameters())
    handle = p.register_hook(lambda g: g * float("nan"))   # a gradient gone bad in one group only
    with pytest.raises(F.NonFiniteError, match=r"step 1: the gradient of parameter group 'controlnet' is not finite"):
        F.fit(cfg, model=model, progress=False)
    handle.remove()
    with torch.no_grad():
        model.projection.global_proj.weight[0, 0] = float("inf")  # a diverged weight -> NaN loss
    with pytest.raises(F.NonFiniteError, match=r"step 1: the loss is not finite.*group 'projection' holds non-finite"):
        F.fit(cfg, model=model, progress=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_one_process_accumulating(tiny, data, tmp_path, comfyui):
    from safetensors.torch import load_file

    from instantfamily_nodes.train.model import TrainModel

    cfg = cfg_for(data, tmp_path, tiny, lr_projection=1e-4, lr_controlnet=1e-4)
    steps = 2
    # fork: the children inherit the imported ComfyUI and the registered tiny type (spawn re-imports, ~20 s)
    torch.multiprocessing.start_processes(ddp_worker, args=(2, free_port(), str(comfyui), cfg.to_dict(), steps,
                                                            str(tmp_path / "ddp.safetensors")),
                                          nprocs=2, join=True, start_method="fork")
    ddp = load_file(str(tmp_path / "ddp.safetensors"))

    # one process, same global batch: rank 0's and rank 1's batches (and noise) as two accumulated micro-batches
    model = TrainModel.build(cfg, Manifest.load(cfg.data), "cpu")
    start = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    groups = model.param_groups()
    opt, dev = F.build_optimizer(cfg, groups), torch.device("cpu")
    sched = F.build_scheduler(cfg, opt)
    streams = [open_stream(cfg, r, 2, 0, collate=F.Collate(cfg)) for r in (0, 1)]
    for step in range(steps):
        pairs = [(next(s).batch, F.loss_generator(cfg, r, step, 0, dev)) for r, s in enumerate(streams)]
        F.train_step(model, model, opt, sched, None, groups, pairs, cfg, F.Dist(), step)
    one = model.trainable_state_dict()
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert moved > 1e-5  # the parameters did move
    worst = max(float((ddp[k] - one[k]).abs().max()) for k in one)
    assert worst < 2e-6, worst  # fp32 round-off, far below one update (~lr = 1e-4)
    # Adam hides a gradient's scale, so compare the last step's gradients too: DDP must average, not sum
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and set(grads) == {k[len("grad."):] for k in ddp if k.startswith("grad.")}
    scale = max(float(g.abs().max()) for g in grads.values())
    for n, g in grads.items():
        assert torch.allclose(ddp[f"grad.{n}"], g, rtol=1e-4, atol=1e-5 * scale), n
    print(f"DDP vs 1 process: max |param diff| {worst:.2e}, max |grad diff| "
          f"{max(float((ddp['grad.' + n] - g).abs().max()) for n, g in grads.items()):.2e} (max |grad| {scale:.2e})")


def test_cli_under_torchrun_writes_checkpoints_and_refuses_a_different_resume(tiny, data, tmp_path, comfyui):
    from instantfamily_nodes.train.config import save_config_toml

    cfg_file = tmp_path / "cfg.toml"
    cfg_file.write_text(save_config_toml(cfg_for(data, tmp_path / "cli", tiny, steps=5, checkpoint_every=1,
                                                 keep_last=2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMFYUI_PATH": str(comfyui)}
    cli = ["-m", "instantfamily_nodes.train", "fit", "--config", str(cfg_file), "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port())]
    r = subprocess.run(torchrun + cli + ["--set", "steps=2"], capture_output=True, text=True, timeout=300,
                       env=env, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train fit: step 2/2, done" in r.stdout
    ck = load_checkpoint(tmp_path / "cli" / "checkpoints")
    assert ck.step == 2 and ck.config["steps"] == 2
    assert ck.data_position["world"] == 2 and ck.data_position["next_batch"] == 2
    assert sorted(p.name for p in (tmp_path / "cli" / "checkpoints").iterdir()) == ["step-000000001", "step-000000002"]
    rows = list(csv.DictReader(open(tmp_path / "cli" / "logs" / "train.csv")))
    assert [r["step"] for r in rows] == ["1", "2"]  # rank 0 alone writes the log

    # resumes that would not continue the same run fail fast (before loading any model), naming the reason
    one = [sys.executable] + cli + ["--resume", "--set", "steps=4"]
    r = subprocess.run(one + ["--set", "seed=5"], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert r.returncode == 2 and "config differs in ['seed']" in r.stderr, r.stderr[-2000:]
    r = subprocess.run(one, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert r.returncode == 2 and "world = 2" in r.stderr, r.stderr[-2000:]


def test_validation_identity_scores_through_evaluate(tmp_path):
    """The optional val/identity score on real photos (dlib): the real image scored as its own 'sample' is
    ~1, the two people swapped between their masks score lower, an empty picture scores 0."""
    pytest.importorskip("dlib", reason="the offline face backend needs dlib-bin")
    pytest.importorskip("insightface", reason="face alignment uses insightface.utils.face_align")
    pytest.importorskip("skimage", reason="scikit-image ships the astronaut test photo")
    import matplotlib
    import skimage
    from PIL import Image

    from instantfamily_nodes.evaluate.identity import detect_faces, make_encoder
    from instantfamily_nodes.train.batch import make_batch
    from instantfamily_nodes.train.shards import Sample

    def square(path: Path) -> np.ndarray:
        im = Image.open(path).convert("RGB")
        side = min(im.size)
        return np.asarray(im.crop((0, 0, side, side)).resize((256, 256), Image.BICUBIC))

    a = square(Path(skimage.__file__).parent / "data" / "astronaut.png")
    g = square(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    canvas = np.full((512, 512, 3), 128, np.uint8)
    canvas[128:384, :256], canvas[128:384, 256:] = a, g
    enc = make_encoder("dlib")
    faces = detect_faces(enc, canvas, want=2)
    assert len(faces) == 2
    boxes = np.stack([f.box for f in sorted(faces, key=lambda f: f.box[0])]).astype(np.float32)
    rng = np.random.default_rng(0)
    sample = Sample(key="pair", image=canvas, caption="two people", face_boxes=boxes,
                    face_kps=np.zeros((2, 5, 2), np.float32), face_embedding=rng.standard_normal((2, 64)).astype(np.float32),
                    face_local=rng.standard_normal((2, 7, 7, 128)).astype(np.float32),
                    pose=np.zeros((0, 18, 3), np.float32))
    cfg = TrainConfig(resolution=512, text_dropout=0.0, id_dropout=0.0, face_encoder="dlib")
    batch = make_batch([sample], cfg, np.random.default_rng(1))
    assert int(batch.id_present.sum()) == 2

    def score(img: np.ndarray) -> dict:
        t = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
        return F.identity_scores(cfg, [sample], t, batch, encoder=enc)

    same = score(canvas)["val/identity"]
    swapped = canvas.copy()
    swapped[128:384, :256], swapped[128:384, 256:] = g, a
    other = score(swapped)["val/identity"]
    empty = score(np.full_like(canvas, 128))["val/identity"]
    assert same > 0.99 and empty == 0.0 and other < same - 0.05, (same, other, empty)


def test_run_log_adds_columns_and_a_resume_drops_the_rerun_steps(tmp_path):
    log = F.RunLog(tmp_path, resume_step=0)
    log.scalars(1, {"loss": 1.0})
    log.scalars(2, {"loss": 0.5})
    log.scalars(2, {"val/identity": 0.25})   # the first validation brings a new column
    log.scalars(3, {"loss": 0.25})
    log.close()
    text = (tmp_path / "logs" / "train.csv").read_text().split()
    assert text == ["step,loss,val/identity", "1,1.0,", "2,0.5,", "2,,0.25", "3,0.25,"]
    F.RunLog(tmp_path, resume_step=2).close()    # resumed from step 2: step 3 will be logged again
    assert (tmp_path / "logs" / "train.csv").read_text().split() == text[:4]
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))


def test_ema_follows_the_trained_tensors_by_hand_computation():
    """EMA after each update: e <- decay * e + (1 - decay) * w, started at the initial tensors, in fp32,
    checked in float64 by hand over three steps; non-float tensors are copied."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
            self.register_buffer("count", torch.tensor([3]))

        def trainable_state_dict(self):
            return {"w": self.w, "count": self.count}

    net, d = Net(), 0.9
    ema = F.EMA(net, d)
    expected = np.array([1.0, -2.0, 0.5])
    for w_next, count in (([2.0, 0.0, 0.5], 4), ([0.0, 4.0, -1.5], 5), ([1.0, 1.0, 1.0], 6)):
        with torch.no_grad():
            net.w.copy_(torch.tensor(w_next))
            net.count.fill_(count)
        ema.update(net)
        expected = d * expected + (1 - d) * np.array(w_next, np.float64)
        assert ema.state["w"].dtype == torch.float32
        np.testing.assert_allclose(ema.state["w"].numpy(), expected, rtol=1e-6, atol=1e-7)
        assert ema.state["count"].item() == count
    # the live tensors are untouched by the average
    assert torch.equal(net.w.detach(), torch.tensor([1.0, 1.0, 1.0]))
