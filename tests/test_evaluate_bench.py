"""bench/run_all.py: runs every script present, keeps each device's results, writes one report.
Run on a throwaway bench folder with tiny scripts (the real benchmarks take minutes)."""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

RUN_ALL = Path(__file__).resolve().parent.parent / "bench" / "run_all.py"


@pytest.fixture()
def run_all(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("run_all_under_test", RUN_ALL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    bench = tmp_path / "bench"
    (bench / "results").mkdir(parents=True)
    monkeypatch.setattr(mod, "BENCH", bench)
    monkeypatch.setattr(mod, "RESULTS", bench / "results")
    return mod, bench


def test_runs_every_script_and_keeps_both_devices(run_all, capsys):
    mod, bench = run_all
    res = bench / "results"
    # a script in the common format that understands --quick and --device
    (bench / "attention.py").write_text(
        "import json, sys\nfrom pathlib import Path\n"
        "assert '--quick' in sys.argv\n"
        "dev = sys.argv[sys.argv.index('--device') + 1]\n"
        "Path(__file__).parent.joinpath('results', f'attention-{dev}.json').write_text(json.dumps("
        "{'machine': {'device': dev, 'date': 'today'}, 'columns': ['N', 'ms'], 'rows': [[4, 1.5], [8, 2.25]]}))\n"
        "# argparse: \"--quick\" \"--device\"\n")
    # a script with its own record format, no device suffix, no flags
    (bench / "faces.py").write_text(
        "import json\nfrom pathlib import Path\n"
        "Path(__file__).parent.joinpath('results', 'faces.json').write_text(json.dumps("
        "{'machine': {'cores': 2}, 'dlib': [{'input': 't1.jpg', 'faces': 6}]}))\n")
    (bench / "broken.py").write_text("raise SystemExit(3)\n")
    (bench / "common.py").write_text("raise RuntimeError('common.py is a helper, never run')\n")
    # CUDA numbers from an earlier run on a GPU machine must survive a CPU run
    old = res / "attention-cuda.json"
    old.write_text(json.dumps({"machine": {"device": "cuda", "gpu": "H100"}, "columns": ["N", "ms"], "rows": [[4, 0.1]]}))
    past = time.time() - 3600
    os.utime(old, (past, past))

    out = bench / "RESULTS.md"
    code = mod.main(["--quick", "--device", "cpu", "--output", str(out)])
    assert code == 1                                   # broken.py failed, the others still ran
    assert "broken.py (failed (exit 3))" in capsys.readouterr().err
    assert (res / "faces-cpu.json").is_file()          # per-device copy of a suffix-less result
    text = out.read_text()
    cpu, cuda = text.split("## CPU")[1].split("## CUDA")
    assert cpu.index("### attention") < cpu.index("### faces")
    assert "| 4 | 1.5 |" in cpu and "| 8 | 2.25 |" in cpu and "| t1.jpg | 6 |" in cpu
    assert "| 4 | 0.1 |" in cuda and "gpu: H100" in cuda and "faces" not in cuda
    assert "| broken.py | - | cpu | failed (exit 3) |" in text and "common.py" not in text.split("## CPU")[0]

    # collect-only rebuilds the same tables without running anything
    (bench / "attention.py").write_text("raise SystemExit('must not run')\n")
    assert mod.main(["--collect-only", "--output", str(out)]) == 0
    again = out.read_text()
    assert "| 8 | 2.25 |" in again and "(collect only: no scripts were run)" in again


def test_only_names_unknown_scripts(run_all):
    mod, bench = run_all
    (bench / "attention.py").write_text("")
    with pytest.raises(SystemExit, match="no bench/moa.py; present: attention"):
        mod.main(["--only", "moa"])
