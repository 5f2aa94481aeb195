"""The docs' results tables match what `python -m benchmarks.report` generates from the committed JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.results import RESULTS_DIR


def _committed_results() -> list[Path]:
    return sorted(RESULTS_DIR.glob("*.json"))


def test_committed_tables_match_their_json() -> None:
    """Every marked table in README.md and docs/*.md is what its JSON generates, and every marker has one."""
    problems = report.process(report.doc_files(), check=True)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", _committed_results(), ids=lambda p: p.stem)
def test_committed_results_carry_run_metadata(path: Path) -> None:
    """Every committed result says where and how it was measured; those the report renders are in a doc."""
    payload = json.loads(path.read_text())
    missing = [k for k in report.REQUIRED_META if k not in payload.get("meta", {})]
    assert not missing, f"{path.name}: meta lacks {missing} (write it with benchmarks.results.write_results)"
    if report.kind_of(path.stem):
        assert report.render(path.stem).strip()
        marker = f"<!-- results:begin {path.stem} -->"
        assert any(marker in doc.read_text() for doc in report.doc_files()), (
            f"{path.name} is in no doc's tables"
        )


def test_npt_sweep_has_its_own_renderer() -> None:
    """npt_component_sweep_cpu renders as a sweep (longest kind): a row per (k, r), ratios to factored."""
    assert report.kind_of("npt_component_sweep_cpu") == "npt_component_sweep"
    assert report.kind_of("npt_component_small_cpu") == "npt_component"
    payload = json.loads((RESULTS_DIR / "npt_component_sweep_cpu.json").read_text())
    lines = report.render_npt_component_sweep(payload)
    rows = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(payload["results"]["points"]) and "loop / factored" in lines[2]


META = {
    "commit": "0123456789abcdef",
    "dirty": False,
    "date": "2026-01-02T03:04:05+00:00",
    "cpu": "Test CPU",
    "cores": 2,
    "torch": "2.0",
    "python": "3.11",
    "command": "python benchmarks/toy.py",
    "load_before": [0.5, 0.4, 0.3],
    "load_after": [1.5, 1.0, 0.5],
}


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A results folder with one 'toy' result and a renderer for it."""
    monkeypatch.setitem(report.RENDERERS, "toy", lambda p: ["| x |", "|---|", f"| {p['results']['x']} |"])
    results = tmp_path / "results"
    results.mkdir()
    (results / "toy.json").write_text(json.dumps({"meta": META, "results": {"x": 7}}))
    return results


def test_stale_table_is_reported_then_regenerated(toy: Path, tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- results:begin toy -->\n| x |\n|---|\n| 6 |\n<!-- results:end toy -->\nend\n")
    problems = report.process([doc], check=True, results_dir=toy)
    assert len(problems) == 1 and "'toy' differs" in problems[0]
    assert report.process([doc], check=False, results_dir=toy) == []
    text = doc.read_text()
    assert "| 7 |" in text and "| 6 |" not in text
    assert text.startswith("intro\n") and text.endswith("<!-- results:end toy -->\nend\n")
    assert "commit `0123456` on 2026-01-02: Test CPU, 2 cores" in text
    assert "load average 0.50 before, 1.50 after" in text
    assert report.process([doc], check=True, results_dir=toy) == []


def test_marker_without_json_is_reported(toy: Path, tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- results:begin toy_missing -->\n<!-- results:end toy_missing -->\n")
    for check in (True, False):
        problems = report.process([doc], check=check, results_dir=toy)
        assert len(problems) == 1 and "'toy_missing' has no" in problems[0]


def test_marker_with_unknown_kind_and_unclosed_markers_are_reported(toy: Path, tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- results:begin nothing_known -->\n<!-- results:end nothing_known -->\n")
    assert "no renderer" in report.process([doc], check=True, results_dir=toy)[0]
    doc.write_text("<!-- results:begin toy -->\n| x |\n")
    assert "has no results:end" in report.process([doc], check=True, results_dir=toy)[0]
    doc.write_text("<!-- results:end toy -->\n")
    assert "without a matching results:begin" in report.process([doc], check=True, results_dir=toy)[0]


def test_result_without_run_metadata_is_reported(toy: Path, tmp_path: Path) -> None:
    meta = {k: v for k, v in META.items() if k != "load_after"}
    (toy / "toy.json").write_text(json.dumps({"meta": meta, "results": {"x": 7}}))
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- results:begin toy -->\n<!-- results:end toy -->\n")
    problems = report.process([doc], check=True, results_dir=toy)
    assert len(problems) == 1 and "load_after" in problems[0]


def test_spd_reference_speed_names_the_gpu_and_precision() -> None:
    """A GPU run of spd_reference_speed says which GPU, not CPU threads, and its precision."""
    payload = json.loads((RESULTS_DIR / "spd_reference_speed_cpu_bf16.json").read_text())
    head = report.render_spd_reference_speed(payload)[0]
    assert "on cpu, 1 thread(s), each implementation's forward under bfloat16 autocast" in head
    payload["results"]["device"] = "cuda"
    payload["meta"]["gpu"] = "NVIDIA H200"
    payload["results"]["precision"] = "32-true"
    head = report.render_spd_reference_speed(payload)[0]
    assert "on NVIDIA H200, float32:" in head and "thread" not in head


def test_spd_reference_speed_bounds_the_speedup_by_the_shared_floor() -> None:
    """The floor both implementations must run (target blocks, head matmuls) bounds the reachable ratio."""
    payload = json.loads((RESULTS_DIR / "spd_reference_speed_cpu_bf16.json").read_text())
    r = payload["results"]
    r["impls"]["ours"]["step_ms"], r["impls"]["reference"]["step_ms"] = 550.0, 980.0
    r["shared_floor"] = {
        "ms": {"block_fwd_bwd": 5.0, "block_fwd": 2.5, "head_pair": 6.0},
        "counts": {
            "ours": {"block_fwd_bwd": 44, "block_fwd": 4, "head_pair": 17},
            "reference": {"block_fwd_bwd": 68, "block_fwd": 4, "head_pair": 17},
        },
        "floor_ms": {"ours": 44 * 5.0 + 4 * 2.5 + 17 * 6.0, "reference": 68 * 5.0 + 4 * 2.5 + 17 * 6.0},
    }
    tail = report.render_spd_reference_speed(payload)[-1]
    assert "ours runs 44 + 4 blocks and 17 head pairs (332 ms), the reference 68 + 4 and 17 (452 ms)" in tail
    assert "2.95x, bounds" in tail and "(its step less its floor, 218 ms) at 158 ms or less" in tail


def test_spd_reference_speed_counts_operator_calls_where_recorded() -> None:
    """Operator calls per implementation appear as a column (and their ratio) only when the run counted them."""
    payload = json.loads((RESULTS_DIR / "spd_reference_speed_cpu_bf16.json").read_text())
    impls = payload["results"]["impls"]
    for row in impls.values():
        row.pop("ops", None)
        row.pop("ops_gpu_head", None)
        row.pop("launches", None)  # their own column (test_..._counts_kernel_launches_where_recorded)
    lines = report.render_spd_reference_speed(payload)
    assert not any("operator calls" in line for line in lines)
    for impl, work in (("reference", 9000), ("naive", 8000), ("ours", 3600)):
        impls[impl]["ops"] = {"work": work, "syncs": 3, "views": 0, "by_op": {}}
    impls["ours_compile"]["ops"] = None  # compiled kernels are not counted
    lines = report.render_spd_reference_speed(payload)
    table = [line for line in lines if line.startswith("|")]
    assert table[0].endswith("| operator calls (syncs) |")
    assert "| 3,600 (3) |" in next(line for line in table if line.startswith("| ours |"))
    assert next(line for line in table if line.startswith("| ours + compile |")).endswith("| - |")
    assert "the reference makes 2.50x ours' calls" in lines[-1] and "counted that way" not in lines[-1]
    impls["ours"]["ops_gpu_head"] = {"work": 3000, "syncs": 0, "views": 0, "by_op": {}}
    tail = report.render_spd_reference_speed(payload)[-1]
    assert "counted that way, 3,000 calls, the reference's 3.00x" in tail


def test_spd_reference_speed_names_its_batch_where_recorded() -> None:
    """A run at another batch (e.g. the overhead-bound 1 x 4 tokens) says so in its first sentence."""
    payload = json.loads((RESULTS_DIR / "spd_reference_speed_cpu.json").read_text())
    payload["results"].pop("batch", None)
    payload["results"].pop("seq", None)
    assert "tokens (forward" not in report.render_spd_reference_speed(payload)[0]
    payload["results"] |= {"batch": 1, "seq": 4}
    head = report.render_spd_reference_speed(payload)[0]
    assert head.startswith("The tiny LM's SPD training step at 1 x 4 tokens (forward + backward + AdamW)")


def test_spd_reference_speed_counts_kernel_launches_where_recorded() -> None:
    """Kernel launches appear as a column, with the reference's over each of ours' and, on a CPU, how far
    the estimate is from the operator calls on the eager steps, only when the run counted them."""
    payload = json.loads((RESULTS_DIR / "spd_reference_speed_cpu_bf16.json").read_text())
    impls = payload["results"]["impls"]
    for row in impls.values():
        row.pop("launches", None)
    assert not any("kernel launches" in line.lower() for line in report.render_spd_reference_speed(payload))

    def counted(n: int, compiled: int = 0) -> dict:
        return {"launches": n, "compiled_kernels": compiled, "by_op": {}}

    for row in impls.values():
        row["ops"] = row["ops_gpu_head"] = None
    impls["reference"] |= {
        "launches": counted(4000),
        "ops": {"work": 4040, "syncs": 0, "views": 0, "by_op": {}},
    }
    impls["ours"] |= {"launches": counted(2000), "ops": {"work": 1900, "syncs": 0, "views": 0, "by_op": {}},
                      "ops_gpu_head": {"work": 1980, "syncs": 0, "views": 0, "by_op": {}}}  # fmt: skip
    impls["ours_compile"]["launches"] = counted(1600, 80)
    lines = report.render_spd_reference_speed(payload)
    table = [line for line in lines if line.startswith("|")]
    assert table[0].endswith("| kernel launches |")
    assert next(line for line in table if line.startswith("| ours + compile |")).endswith("| 1,600 |")
    assert next(line for line in table if line.startswith("| our naive form |")).endswith("| - |")
    tail = lines[-1]
    assert "The reference launches 4,000, over ours': ours 2.00x; ours + compile 2.50x (80 of them" in tail
    assert "within 1.0%" in tail  # reference 4,000 / 4,040, ours 2,000 / 1,980 (the GPU's head blocks)
