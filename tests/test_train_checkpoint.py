"""Training checkpoints: exact round trip without pickle, atomic under a real SIGKILL mid-save, a full disk,
last K kept, damaged files refused. Uses a real torch optimizer/scheduler on a small network: the checkpoint
code is model-agnostic (the trainer's end-to-end resume is in test_train_fit.py)."""
from __future__ import annotations

import errno
import json
import pickle
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from instantfamily_nodes.train import checkpoint as ckpt
from instantfamily_nodes.train.checkpoint import (CheckpointError, capture_rng_states, latest_checkpoint,
                                                  load_checkpoint, restore_rng_states, save_checkpoint)


def trained(seed: int = 0, steps: int = 3):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    opt = torch.optim.AdamW([{"params": net[0].parameters(), "lr": 1e-2, "name": "a"},
                             {"params": net[2].parameters(), "lr": 3e-3, "name": "b"}], betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(4, 5)).square().mean().backward()
        opt.step()
        sched.step()
    return net, opt, sched


def save(d, step, net, opt, sched, **kw):
    return save_checkpoint(d, step, net.state_dict(), opt, sched, kw.pop("ema", None), capture_rng_states(),
                           {"next_batch": step * 2, "world": 1}, {"seed": 0, "steps": 10}, **kw)


def test_round_trip_is_exact_and_nothing_is_pickled(tmp_path, monkeypatch):
    net, opt, sched = trained()
    ema = {k: v * 0.5 for k, v in net.state_dict().items()}
    path = save(tmp_path, 3, net, opt, sched, ema=ema)
    assert path.name == "step-000000003"
    assert sorted(p.suffix for p in path.iterdir()) == [".json"] * 3 + [".safetensors"] * 4

    def refuse(*a, **k):
        raise AssertionError("a checkpoint load must never unpickle")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    ck = load_checkpoint(tmp_path)
    assert ck.step == 3 and ck.data_position == {"next_batch": 6, "world": 1} and ck.config["steps"] == 10
    for k, v in net.state_dict().items():
        assert torch.equal(ck.model_state[k], v) and torch.equal(ck.ema_state[k], ema[k])

    # the restored optimizer/scheduler continue exactly like the originals
    net2, opt2, sched2 = trained(seed=1, steps=1)
    net2.load_state_dict(ck.model_state)
    opt2.load_state_dict(ck.optimizer_state)
    sched2.load_state_dict(ck.scheduler_state)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, st in a["state"].items():
        for name, v in st.items():
            assert torch.equal(v, b["state"][i][name]) and v.dtype == b["state"][i][name].dtype
    x = torch.randn(4, 5)
    for n, o, s in ((net, opt, sched), (net2, opt2, sched2)):
        o.zero_grad()
        n(x).square().mean().backward()
        o.step()
        s.step()
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)


def test_rng_states_restore_every_generator():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    saved = json.loads(json.dumps({k: v for k, v in capture_rng_states().items() if not torch.is_tensor(v)}))
    saved["torch_cpu"] = capture_rng_states()["torch_cpu"]
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_states(saved)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])


def test_last_k_kept(tmp_path):
    net, opt, sched = trained()
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, step, net, opt, sched, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000004", "step-000000005"]
    assert load_checkpoint(tmp_path, step=4).step == 4
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 2; have steps \[4, 5\]"):
        load_checkpoint(tmp_path, step=2)


def test_sigkill_between_tensors_and_manifest_leaves_the_previous_checkpoint(tmp_path):
    """A real kill (SIGKILL: no cleanup code runs) right before the manifest of step 2 is written."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from instantfamily_nodes.train import checkpoint as ck
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_train_checkpoint import trained, save
        net, opt, sched = trained()
        save({str(tmp_path)!r}, 1, net, opt, sched)
        trained_more = trained(steps=5)
        ck._before_manifest = lambda tmp: os.kill(os.getpid(), signal.SIGKILL)
        save({str(tmp_path)!r}, 2, *trained_more)
        print("not killed")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-step-000000002")]
    assert leftovers, "the killed save should have left its temp folder (with the tensors, no manifest)"
    assert (tmp_path / leftovers[0] / "trainable.safetensors").is_file()
    assert latest_checkpoint(tmp_path).name == "step-000000001"
    ck = load_checkpoint(tmp_path)
    net, _, _ = trained()
    assert ck.step == 1 and all(torch.equal(ck.model_state[k], v) for k, v in net.state_dict().items())
    # the next successful save clears the dead temp folder
    save(tmp_path, 2, *trained())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_full_disk_is_a_clear_error_and_keeps_the_previous(tmp_path, monkeypatch):
    net, opt, sched = trained()
    save(tmp_path, 1, net, opt, sched)
    real = ckpt._write_bytes
    calls = []

    def full_disk(path, data):
        calls.append(path.name)
        if path.name == "optimizer.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)
    monkeypatch.setattr(ckpt, "_write_bytes", full_disk)
    with pytest.raises(CheckpointError) as e:
        save(tmp_path, 2, net, opt, sched)
    msg = str(e.value)
    assert "step 2" in msg and "No space left on device" in msg and "step-000000001 is intact" in msg
    assert "free disk space" in msg
    assert "optimizer.safetensors" in calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000001"]  # no temp folder left
    assert load_checkpoint(tmp_path).step == 1


def test_damaged_or_foreign_checkpoints_are_refused(tmp_path):
    net, opt, sched = trained()
    path = save(tmp_path, 1, net, opt, sched)
    with open(path / "optimizer.safetensors", "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match="optimizer.safetensors is missing or has the wrong size"):
        load_checkpoint(path)
    (path / "checkpoint.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not an InstantFamily training checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "empty")
