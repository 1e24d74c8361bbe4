"""tools/measure/gpu_check: the CPU rehearsal of every section writes both summaries with every field;
without CUDA the check says so in one line and exits 1."""
import json
import os
import subprocess

import pytest
import torch

from tools.measure import benchmark, gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rehearsal_writes_summary_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setitem(benchmark.PEAK_SHAPE, "cpu", (1, 16))
    out = str(tmp_path / "out")
    summary = gpu_check.run_check(out, torch.device("cpu"), budget_s=10_000)
    on_disk = json.loads(open(os.path.join(out, "summary.json")).read())
    assert on_disk["ok"] == summary["ok"] is True, on_disk
    assert on_disk["rehearsal"] is True and set(on_disk["machine"]) >= {"device", "torch", "cuda", "date"}
    sections = on_disk["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    assert sections["cuda_tests"]["skipped"].startswith("the CUDA-only tests need")
    steps = sections["train_steps"]["rows"]
    assert [(r["amp"], r["channels_last"]) for r in steps] == [
        (a, c) for a in ("none", "bf16", "fp16") for c in (False, True)]
    assert all(r["skipped"] == "fp16 needs CUDA" for r in steps if r["amp"] == "fp16")
    for r in steps[:4]:
        assert r["ok"] and r["step_ms"] > 0 and len(r["total_loss"]) == 3 and r["grad_scale"] is None
    rows = sections["benchmark"]["rows"]
    assert [(r["row"], r["amp"]) for r in rows] == [
        (n, a) for n in ("PASCAL R50 1-shot 473", "PASCAL R50 5-shot 473", "COCO R50 1-shot 641",
                         "PASCAL ViT-S/14 1-shot 476", "PASCAL ViT-B/14 1-shot 476")
        for a in ("none", "bf16")]
    assert all(r["ok"] and r["train_step_ms"] > 0 and r["sync_free"] for r in rows)
    assert rows[0]["loader_episodes_per_s"] > 0 and rows[1]["loader_episodes_per_s"] is None
    assert rows[1]["amp_loss_max_abs_diff"] >= 0 and "amp_loss_max_abs_diff" not in rows[0]
    ev = sections["eval_1000"]
    assert ev["episodes"] == 8 and set(ev["runs"]) == {"none", "bf16"}
    assert 0 <= ev["runs"]["bf16"]["pixel_agreement_pct"] <= 100
    ddp = sections["torchrun_nccl"]
    assert ddp["ok"] and ddp["backend"] == "gloo" and ddp["checkpoint_written"], ddp
    assert all(s["seconds"] >= 0 for s in sections.values())
    md = open(os.path.join(out, "summary.md")).read()
    for heading in ("# GPU check", "| section | result | seconds |", "## Training steps",
                    "## Benchmark rows", "## Evaluation, 8 episodes", "## torchrun, one process: exit 0"):
        assert heading in md, heading
    assert "all sections passed" in md and "CPU rehearsal at tiny sizes" in md


def test_a_failing_section_is_recorded_and_fails_the_check(tmp_path, monkeypatch):
    def broken(device, out, budget):
        raise RuntimeError("boom")
    monkeypatch.setitem(gpu_check.RUNNERS, "train_steps", broken)
    summary = gpu_check.run_check(str(tmp_path), torch.device("cpu"), only=("train_steps",))
    assert summary["ok"] is False
    assert "RuntimeError: boom" in summary["sections"]["train_steps"]["error"]
    assert summary["sections"]["benchmark"]["skipped"] == "not selected"
    assert "FAILED: RuntimeError: boom" in open(tmp_path / "summary.md").read()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_without_cuda_one_line_and_exit_1(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err
    assert not os.path.exists(tmp_path / "a" / "summary.json")
    proc = subprocess.run(["sh", "tools/measure/gpu_check.sh", str(tmp_path / "b")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "no CUDA device" in proc.stderr
    assert not os.path.exists(tmp_path / "b" / "summary.json")
