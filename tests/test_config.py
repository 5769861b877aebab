"""Config loading: typed values, errors that name the key path, cluster resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetsched.config import load_config, parse_config, resolve_clusters
from hetsched.errors import ConfigError
from hetsched.host.topology import Cluster, Topology

ROOT = Path(__file__).resolve().parents[1]
ONE_KIND = Topology((Cluster("cpu", (0, 1), 1.0),), "uniform", "/sys")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(path):
    cfg = load_config(str(path))
    assert cfg.planner.max_stages is None or cfg.planner.max_stages >= 1


def test_big_little_config_emulates_a_little_half_on_alike_cores():
    cfg = load_config(str(ROOT / "configs" / "big_little.yaml"))
    big, little = resolve_clusters(cfg, ONE_KIND, existing={0, 1}, allowed={0, 1})
    assert (big.name, big.cores, big.emulated_speed) == ("big", (0,), None)
    assert (little.name, little.cores, little.emulated_speed) == ("little", (1,), 0.5)


def test_big_little_config_uses_real_clusters_when_the_host_has_them():
    cfg = load_config(str(ROOT / "configs" / "big_little.yaml"))
    topo = Topology((Cluster("big", (4, 5, 6, 7), 1.0), Cluster("little", (0, 1, 2, 3), 0.52)), "cpu_capacity", "/x")
    clusters = resolve_clusters(cfg, topo, existing=set(range(8)), allowed=set(range(8)))
    assert [c.emulated_speed for c in clusters] == [None, None]


@pytest.mark.parametrize("raw, message", [
    ({"clusters": {"big": {"cores": [0]}, "little": {"cores": [1, 9]}}},
     "clusters.little.cores[1]: core 9 does not exist on this host (0-1)"),
    ({"clusters": {"big": {"cores": [0, 0]}}}, "clusters.big.cores[1]: core 0 is already in cluster 'big'"),
    ({"clusters": {"big": {"cores": []}}}, "clusters.big.cores: empty"),
    ({"clusters": {"big": {"cores": [0], "speed": 2}}}, "clusters.big.speed: must be between"),
    ({"clusters": {"big": {"cpus": [0]}}}, "clusters.big.cpus: unknown key"),
    ({"planner": {"max_stages": 0}}, "planner.max_stages: must be >= 1"),
    ({"planner": {"tie_tolerance": "x"}}, "planner.tie_tolerance: expected a number"),
    ({"profile": {"cache": "yes"}}, "profile.cache: expected true or false"),
    ({"transport": {"kind": "udp"}}, "transport.kind: must be one of ipc, tcp"),
    ({"bogus": 1}, "bogus: unknown key"),
    ({"input": {"mean": [1, 2]}}, "input.mean: expected 3 numbers"),
])
def test_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        cfg = parse_config(raw)
        resolve_clusters(cfg, ONE_KIND, existing={0, 1}, allowed={0, 1})
    assert message in str(err.value)


def test_core_outside_allowed_set():
    cfg = parse_config({"clusters": {"big": {"cores": [0]}, "little": {"cores": [1]}}})
    with pytest.raises(ConfigError, match=r"clusters.little.cores\[0\]: core 1 is outside this process's allowed CPU set"):
        resolve_clusters(cfg, ONE_KIND, existing={0, 1}, allowed={0})


def test_yaml_errors_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError):
        load_config(str(evil))   # safe loader: no code execution


def test_model_path_is_relative_to_the_config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: ../models/x.onnx\n")
    assert load_config(str(p)).model == str((tmp_path.parent / "models" / "x.onnx").resolve())
