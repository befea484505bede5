"""`make gpu-check` without a GPU: one line, exit 0; and its sections run end to end on the CPU
(hidden --device cpu --quick), so that the script does not rot between GPU runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rcm import gpucheck, paths

REPO = Path(__file__).resolve().parents[1]


def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpucheck.main(["--out", str(tmp_path / "x.md")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0] and not (tmp_path / "x.md").exists()


def test_every_section_runs_on_the_cpu_and_prints_one_table(digits_results, tmp_path, monkeypatch, capsys):
    from rcm.checkpoint import save_checkpoint
    from rcm.models.classifier import Classifier

    torch.manual_seed(0)
    net = Classifier(in_channels=1, num_classes=10, image_size=8, width=4, blocks=1, stages=1)
    save_checkpoint(paths.classifier(digits_results, "digits", 0.5), kind="classifier",
                    model_config=net.config, model_state=net.state_dict(), step=0)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    assert gpucheck.main(["--device", "cpu", "--quick", "--results", str(digits_results), "--budget", "120"]) == 0
    text = (tmp_path / "out" / "gpu_check.md").read_text()
    assert text in capsys.readouterr().out
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    sections = {r[0].strip("| ") for r in rows}
    assert sections == {"tests", "throughput", "training", "cpu vs cuda"}
    assert not [r for r in rows if "FAILED" in r[2] or "exit" in r[2]], text
    by_item = {r[1]: r for r in rows}
    assert "skipped" in by_item["pytest -m cuda"][3] or "deselected" in by_item["pytest -m cuda"][3]
    assert [r[2] for r in rows if r[0] == "| throughput"][:5] != ["skipped"] * 5
    assert by_item["digits gaussian fp32"][2].endswith("draws/s"), text
    assert by_item["digits gaussian bf16 compiled"][2].endswith("draws/s")
    # the config's methods with a preset builder, mdds once as dds's network
    assert "same network as dds" in by_item["digits mdds"][2] and "digits mdds fp32" not in by_item, text
    for prec in ("fp32", "bf16"):
        rates = {m: float(by_item[f"digits {m} {prec}"][2].split()[0]) for m in ("gaussian", "dds", "rrcm")}
        latency = by_item[f"digits latency relative to the fastest ({prec})"]
        ratios = dict(entry.rsplit(" ", 1) for entry in latency[2].split(", "))
        assert set(ratios) == {f"digits {m}" for m in rates}, latency
        for m, rate in rates.items():
            assert float(ratios[f"digits {m}"][:-1]) == pytest.approx(max(rates.values()) / rate, rel=0.01)
        assert "1x" in ratios.values() and "85x" in latency[3]
    assert {f"digits {s}" for s in gpucheck.STAGES} <= set(by_item)
    assert all(by_item[f"digits {s}"][2] == "ran (no CUDA memory)" for s in gpucheck.STAGES), text
    assert by_item["gaussian sigma 0.5"][2] == "3/3 predictions agree"      # the CPU against itself
    assert by_item["dds sigma 0.5"][2] == "skipped" and "no model" in by_item["dds sigma 0.5"][3]


def test_make_gpu_check_runs_the_script():
    text = (REPO / "Makefile").read_text()
    assert "gpu-check:" in text and "-m rcm.gpucheck" in text
