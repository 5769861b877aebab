"""Tests for hetsched.host.topology against the fixture trees in tests/data/sysfs (see its README)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetsched.errors import TopologyError
from hetsched.host.topology import (
    INTEL_E_CORE_DEFAULT_SPEED,
    Cluster,
    Topology,
    cluster_names,
    detect_topology,
    format_cpulist,
    format_topology,
    parse_cpulist,
)

SYSFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sysfs")


def fixture(name: str) -> str:
    return os.path.join(SYSFS, name)


def shape(topo: Topology) -> list[tuple[str, tuple[int, ...]]]:
    return [(c.name, c.cores) for c in topo.clusters]


def copy_tree(name: str, tmp_path) -> str:
    dst = os.path.join(str(tmp_path), name)
    shutil.copytree(fixture(name), dst)
    return dst


def cpu_file(root: str, cpu: int, rel: str) -> str:
    return os.path.join(root, "devices", "system", "cpu", f"cpu{cpu}", rel)


# --------------------------------------------------------------------------- parse_cpulist


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0-3,6", (0, 1, 2, 3, 6)),
        ("0", (0,)),
        ("0-11\n", tuple(range(12))),
        ("0,2,4-7", (0, 2, 4, 5, 6, 7)),
        ("", ()),
        ("\n", ()),
        ("  1 , 3 \n", (1, 3)),
        ("5,1,3-4", (1, 3, 4, 5)),  # unsorted input -> sorted output
        ("0-3,2-5", (0, 1, 2, 3, 4, 5)),  # overlaps deduplicated
        ("7-7", (7,)),
        ("0-7:2/4", (0, 1, 4, 5)),  # kernel group syntax: first 2 of every 4
        ("120-127", tuple(range(120, 128))),
    ],
)
def test_parse_cpulist(text, expected):
    assert parse_cpulist(text) == expected


@pytest.mark.parametrize("text", ["3-1", "a", "1,,2", "0-", "-1", "1-2-3", "0,", "0-7:0/4", "0-7:5/4", "0x3"])
def test_parse_cpulist_rejects_malformed(text):
    with pytest.raises(TopologyError):
        parse_cpulist(text)


def test_format_cpulist():
    assert format_cpulist((0, 1, 2, 3, 6)) == "0-3,6"
    assert format_cpulist([7]) == "7"
    assert format_cpulist([]) == ""
    assert format_cpulist([4, 0, 2, 1]) == "0-2,4"


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(min_value=0, max_value=300), max_size=40))
def test_cpulist_roundtrip(cpus):
    assert parse_cpulist(format_cpulist(cpus)) == tuple(sorted(cpus))


def test_cluster_names():
    assert cluster_names(1) == ["cpu"]
    assert cluster_names(2) == ["big", "little"]
    assert cluster_names(3) == ["prime", "mid", "little"]
    assert cluster_names(5) == ["cluster0", "cluster1", "cluster2", "cluster3", "cluster4"]


# --------------------------------------------------------------------------- fixture trees


def test_rk3588_big_little_by_capacity():
    topo = detect_topology(fixture("rk3588"))
    assert topo.source == "cpu_capacity"
    # cpu6-7 have a lower max freq than cpu4-5 but the same capacity: one big cluster
    assert shape(topo) == [("big", (4, 5, 6, 7)), ("little", (0, 1, 2, 3))]
    big, little = topo.clusters
    assert big.speed == 1.0
    assert little.speed == pytest.approx(530 / 1024)
    assert little.speed == pytest.approx(0.518, abs=1e-3)
    assert (big.capacity, little.capacity) == (1024, 530)
    assert (big.max_freq_khz, little.max_freq_khz) == (2400000, 1800000)
    assert big.smt_siblings == little.smt_siblings == ()
    assert big.emulated_speed is None and little.emulated_speed is None
    assert topo.all_cores() == tuple(range(8))
    assert topo.sysfs_root == fixture("rk3588")


def test_snapdragon_prime_mid_little():
    topo = detect_topology(fixture("snapdragon_8gen2"))
    assert topo.source == "cpu_capacity"
    assert shape(topo) == [("prime", (7,)), ("mid", (3, 4, 5, 6)), ("little", (0, 1, 2))]
    assert [c.speed for c in topo.clusters] == pytest.approx([1.0, 870 / 1024, 325 / 1024])
    assert [c.capacity for c in topo.clusters] == [1024, 870, 325]


def test_intel_hybrid_p_and_e_cores():
    topo = detect_topology(fixture("intel_hybrid"))
    assert topo.source == "intel_hybrid"
    assert shape(topo) == [("p-core", tuple(range(8))), ("e-core", tuple(range(8, 16)))]
    p, e = topo.clusters
    assert p.speed == 1.0
    assert e.speed == pytest.approx(3400000 / 4700000)  # cpufreq known -> freq ratio
    assert p.smt_siblings == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert e.smt_siblings == ()
    assert p.capacity is None and e.capacity is None
    assert (p.max_freq_khz, e.max_freq_khz) == (4700000, 3400000)


def test_intel_hybrid_preferred_over_cpufreq_turbo_bins(tmp_path):
    # favoured cores: cpu0-1 turbo to 4.7 GHz, the other P-cores only to 4.6 GHz; cpufreq
    # grouping would give three clusters, the hybrid files keep two.
    root = copy_tree("intel_hybrid", tmp_path)
    for cpu in range(2, 8):
        with open(cpu_file(root, cpu, "cpufreq/cpuinfo_max_freq"), "w") as f:
            f.write("4600000\n")
    topo = detect_topology(root)
    assert topo.source == "intel_hybrid"
    assert shape(topo) == [("p-core", tuple(range(8))), ("e-core", tuple(range(8, 16)))]
    assert topo.clusters[0].max_freq_khz == 4700000
    assert topo.clusters[1].speed == pytest.approx(3400000 / 4700000)


def test_intel_hybrid_without_cpufreq_uses_default_e_speed(tmp_path):
    root = copy_tree("intel_hybrid", tmp_path)
    for cpu in range(16):
        shutil.rmtree(os.path.dirname(cpu_file(root, cpu, "cpufreq/x")))
    topo = detect_topology(root)
    assert topo.source == "intel_hybrid"
    p, e = topo.clusters
    assert (p.speed, e.speed) == (1.0, INTEL_E_CORE_DEFAULT_SPEED) == (1.0, 0.6)
    assert p.max_freq_khz is None and e.max_freq_khz is None


def test_server_uniform_with_smt():
    topo = detect_topology(fixture("server"))
    assert topo.source == "cpufreq"
    assert shape(topo) == [("cpu", tuple(range(8)))]
    (c,) = topo.clusters
    assert c.speed == 1.0 and c.max_freq_khz == 3000000 and c.capacity is None
    assert c.smt_siblings == ((0, 4), (1, 5), (2, 6), (3, 7))


def test_cpufreq_grouping_when_no_capacity(tmp_path):
    root = copy_tree("rk3588", tmp_path)
    for cpu in range(8):
        os.remove(cpu_file(root, cpu, "cpu_capacity"))
    topo = detect_topology(root)
    assert topo.source == "cpufreq"
    # without capacity the two A76 pairs (2.4 vs 2.256 GHz) are different kinds
    assert shape(topo) == [("prime", (4, 5)), ("mid", (6, 7)), ("little", (0, 1, 2, 3))]
    assert [c.speed for c in topo.clusters] == pytest.approx([1.0, 2256 / 2400, 1800 / 2400])


def test_partial_capacity_falls_back_to_cpufreq(tmp_path):
    root = copy_tree("snapdragon_8gen2", tmp_path)
    os.remove(cpu_file(root, 7, "cpu_capacity"))
    topo = detect_topology(root)
    assert topo.source == "cpufreq"
    assert shape(topo) == [("prime", (7,)), ("mid", (3, 4, 5, 6)), ("little", (0, 1, 2))]


def test_no_information_gives_uniform(tmp_path):
    root = os.path.join(str(tmp_path), "bare")
    os.makedirs(os.path.join(root, "devices", "system", "cpu"))
    with open(os.path.join(root, "devices", "system", "cpu", "online"), "w") as f:
        f.write("0-3\n")
    topo = detect_topology(root)
    assert topo.source == "uniform"
    assert shape(topo) == [("cpu", (0, 1, 2, 3))]
    assert topo.clusters[0].speed == 1.0


def test_missing_online_file_enumerates_cpu_dirs(tmp_path):
    root = copy_tree("rk3588_cpu3_offline", tmp_path)
    os.remove(os.path.join(root, "devices", "system", "cpu", "online"))
    topo = detect_topology(root)  # cpu3/online reads 0
    assert shape(topo) == [("big", (4, 5, 6, 7)), ("little", (0, 1, 2))]


def test_more_than_three_kinds_named_clusterN(tmp_path):
    root = copy_tree("rk3588", tmp_path)
    for cpu, cap in enumerate([100, 100, 200, 200, 300, 300, 1024, 1024]):
        with open(cpu_file(root, cpu, "cpu_capacity"), "w") as f:
            f.write(f"{cap}\n")
    topo = detect_topology(root)
    assert shape(topo) == [("cluster0", (6, 7)), ("cluster1", (4, 5)),
                           ("cluster2", (2, 3)), ("cluster3", (0, 1))]


# --------------------------------------------------------------------------- filtering


def test_offline_cpu_left_out():
    topo = detect_topology(fixture("rk3588_cpu3_offline"))
    assert shape(topo) == [("big", (4, 5, 6, 7)), ("little", (0, 1, 2))]
    assert 3 not in topo.all_cores()
    assert topo.clusters[1].speed == pytest.approx(530 / 1024)


def test_allowed_cpus_filter():
    topo = detect_topology(fixture("rk3588"), allowed_cpus={1, 2, 5, 6, 42})
    assert shape(topo) == [("big", (5, 6)), ("little", (1, 2))]
    assert topo.all_cores() == (1, 2, 5, 6)


def test_allowed_cpus_filter_keeps_names_and_renormalises():
    # only the A55 cores allowed: still called "little", now the fastest usable cluster
    topo = detect_topology(fixture("rk3588"), allowed_cpus={0, 1, 2, 3})
    assert shape(topo) == [("little", (0, 1, 2, 3))]
    assert topo.clusters[0].speed == 1.0 and topo.clusters[0].capacity == 530


def test_allowed_cpus_restricts_smt_groups():
    topo = detect_topology(fixture("intel_hybrid"), allowed_cpus={0, 1, 2, 4, 5, 9})
    assert shape(topo) == [("p-core", (0, 1, 2, 4, 5)), ("e-core", (9,))]
    assert topo.clusters[0].smt_siblings == ((0, 1), (4, 5))


def test_allowed_and_offline_combined():
    topo = detect_topology(fixture("rk3588_cpu3_offline"), allowed_cpus={3, 4})
    assert shape(topo) == [("big", (4,))]


def test_empty_after_filtering_raises():
    with pytest.raises(TopologyError, match="no usable CPUs"):
        detect_topology(fixture("rk3588"), allowed_cpus={100, 101})
    with pytest.raises(TopologyError):
        detect_topology(fixture("rk3588_cpu3_offline"), allowed_cpus={3})
    with pytest.raises(TopologyError):
        detect_topology(fixture("rk3588"), allowed_cpus=set())


def test_no_online_cpus_raises(tmp_path):
    root = copy_tree("server", tmp_path)
    with open(os.path.join(root, "devices", "system", "cpu", "online"), "w") as f:
        f.write("\n")
    with pytest.raises(TopologyError, match="no online CPUs"):
        detect_topology(root)


def test_missing_sysfs_tree_raises(tmp_path):
    with pytest.raises(TopologyError, match="no CPU information"):
        detect_topology(os.path.join(str(tmp_path), "nothing-here"))


# --------------------------------------------------------------------------- API surface


def test_cluster_lookup_and_error_names_available():
    topo = detect_topology(fixture("snapdragon_8gen2"))
    assert topo.cluster("mid").cores == (3, 4, 5, 6)
    with pytest.raises(TopologyError) as exc:
        topo.cluster("big")
    msg = str(exc.value)
    assert "big" in msg and "prime" in msg and "mid" in msg and "little" in msg


def test_to_dict_is_json_friendly():
    topo = detect_topology(fixture("intel_hybrid"))
    d = json.loads(json.dumps(topo.to_dict()))
    assert d["source"] == "intel_hybrid"
    assert d["sysfs_root"] == fixture("intel_hybrid")
    p = d["clusters"][0]
    assert p == {
        "name": "p-core",
        "cores": list(range(8)),
        "speed": 1.0,
        "capacity": None,
        "max_freq_khz": 4700000,
        "smt_siblings": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "emulated": False,
        "emulated_speed": None,
    }
    emu = dataclasses.replace(topo.clusters[1], emulated_speed=0.25).to_dict()
    assert emu["emulated"] is True and emu["emulated_speed"] == 0.25


def test_dataclasses_are_frozen():
    c = Cluster(name="cpu", cores=(0,), speed=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.speed = 0.5  # type: ignore[misc]
    assert c.capacity is None and c.max_freq_khz is None and c.smt_siblings == ()


def test_format_topology_table():
    text = format_topology(detect_topology(fixture("rk3588")))
    for needle in ("cluster", "cores", "speed", "capacity", "max freq", "SMT",
                   "big", "little", "4-7", "0-3", "0.518", "1024", "530", "2.40 GHz",
                   "cpu_capacity"):
        assert needle in text
    assert "EMULATED" not in text
    text = format_topology(detect_topology(fixture("server")))
    assert "(0,4)" in text and "cpufreq" in text


def test_format_topology_mentions_emulation():
    topo = detect_topology(fixture("rk3588"))
    big, little = topo.clusters
    topo = dataclasses.replace(
        topo, clusters=(big, dataclasses.replace(little, emulated_speed=0.5)))
    text = format_topology(topo)
    assert "EMULATED: cluster little delivers 50% of its cycles" in text
    assert "cluster big delivers" not in text


# --------------------------------------------------------------------------- real host


@pytest.mark.skipif(not os.path.isdir("/sys/devices/system/cpu"), reason="no sysfs")
def test_real_sysfs_covers_allowed_cpus():
    topo = detect_topology()
    assert len(topo.clusters) >= 1
    assert topo.source in ("cpu_capacity", "intel_hybrid", "cpufreq", "uniform")
    allowed = os.sched_getaffinity(0)
    assert set(topo.all_cores()) == allowed
    assert max(c.speed for c in topo.clusters) == 1.0
    assert topo.clusters == tuple(sorted(topo.clusters, key=lambda c: -c.speed))
    assert format_topology(topo)
