"""``hetsched bench``: a short real run checks the harness (every contender measured, outputs equal the
unsplit model's, JSON/plot/markdown written, every process reaped). No speed is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hetsched.bench import run as bench
from hetsched.errors import EmulationError, HetschedError

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("fps", "fps_rounds", "sat_p50_ms", "sat_p99_ms", "cpu_ms_per_frame", "peak_rss_mb", "vs_limit",
          "vs_ort_all")
FIXED_FIELDS = ("offered_fps", "achieved_fps", "p50_ms", "p99_ms", "cpu_ms_per_frame")


def _realtime_ok() -> bool:
    from hetsched.host.emulation import check_realtime_permitted
    try:
        check_realtime_permitted()
    except EmulationError:
        return False
    return len(os.sched_getaffinity(0)) >= 2


@pytest.mark.timeout(120)
@pytest.mark.skipif(not _realtime_ok(), reason="needs 2 allowed cores and SCHED_FIFO for the emulated little core")
def test_quick_run_measures_every_contender(tmp_path):
    opts = bench.BenchOptions.quick_defaults(scenarios=["bl0.5"], out=str(tmp_path / "out"),
                                             md=str(tmp_path / "BENCHMARKS.md"), seconds=0.5, fixed_seconds=0.8,
                                             command="pytest quick run")
    result = bench.run_bench(opts)

    on_disk = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert (tmp_path / "out" / "bench.png").stat().st_size > 0
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "pytest quick run" in md and "| hetsched |" in md
    for key in ("cpu_model", "cores_allowed", "kernel", "onnxruntime"):
        assert key in on_disk["machine"]
    assert on_disk["command"] == "pytest quick run" and on_disk["date"]

    (sc,) = on_disk["scenarios"]
    assert sc["name"] == "bl0.5" and sc["emulated"] and set(sc["emulated"].values()) == {0.5}
    assert set(sc["contenders"]) == set(bench.CONTENDERS)
    for name, m in sc["contenders"].items():
        for f in FIELDS:
            assert f in m, (name, f)
        assert m["fps"] > 0, name
        assert m["cpu_ms_per_frame"] > 0, name
        if name != "limit":
            for f in FIXED_FIELDS:
                assert m["fixed"][f] is not None, (name, f)
    assert sc["contenders"]["limit"]["vs_limit"] == 1.0
    assert sc["contenders"]["ort-all"]["vs_ort_all"] == 1.0
    assert set(sc["contenders"]["hetsched"]["cpu_breakdown_ms_per_frame"]) == {"coordinator", "workers", "client"}
    assert len(sc["contenders"]["limit"]["per_core_fps"]) == 2
    # the pipeline's outputs equal the unsplit model's
    assert sc["correctness"]["ok"], sc["correctness"]
    assert sc["correctness"]["checked_frames"] >= 4
    assert sc["correctness"]["max_abs_diff"] <= bench.CORRECT_ATOL
    assert sc["contenders"]["hetsched"]["errors"] == 0
    assert [t["target"] for t in sc["targets"]]  # evaluated (met or not: no speed is asserted)
    assert "hetsched" in bench.format_report(result)


def test_scenarios_and_service_config(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs 2 allowed cores")
    sc = bench.builtin_scenario("bl0.33")
    assert [c.name for c in sc.clusters] == ["big", "little"]
    assert sc.emulated == {core: 0.33 for core in cores[(len(cores) + 1) // 2:]}
    assert sc.fastest_cluster().name == "big"
    raw = sc.service_raw(profile_repeats=None)
    # the service gets the same clusters without `speed` (the bench owns the emulation) and no cost cache
    assert all("speed" not in spec for spec in raw["clusters"].values())
    assert raw["profile"]["cache"] is False
    from hetsched.config import parse_config
    parse_config(raw)  # valid

    homo = bench.builtin_scenario("homogeneous")
    assert not homo.emulated
    assert bench._ort_specs(homo)["ort-fastest-cluster"] == bench._ort_specs(homo)["ort-all"] \
        or len(homo.clusters) > 1

    cfg = REPO / "configs" / "big_little.yaml"
    from_file = bench.config_scenario(str(cfg))
    assert from_file.name == "big_little" and from_file.emulated
    with pytest.raises(HetschedError):
        bench.builtin_scenario("bigger")


def test_cli_parses_options():
    from hetsched.cli.main import build_parser
    args = build_parser().parse_args(["bench", "--config", "a.yaml", "b.yaml", "--scenarios", "bl0.5", "--rounds",
                                      "2", "--seconds", "1.5", "--quick", "--out", "o"])
    opts = bench.options_from_args(args)
    assert opts.configs == ["a.yaml", "b.yaml"] and opts.scenarios == ["bl0.5"]
    assert opts.rounds == 2 and opts.seconds == 1.5 and opts.quick
    assert opts.md == os.path.join("o", "BENCHMARKS.md")


def test_wrapper_script_is_the_subcommand():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--help"], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0 and "--scenarios" in out.stdout
