"""Regenerate the sysfs fixture trees in this directory (see README.md for what they model).

Run from anywhere: ``python tests/data/sysfs/make_fixtures.py``. It rewrites the trees in place;
the generated files are committed, so tests never need to run this.
"""

from __future__ import annotations

import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from hetsched.host.topology import format_cpulist  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="ascii") as f:
        f.write(text + "\n")


def cpulist(cpus) -> str:
    return format_cpulist(cpus)


def make_tree(name, ncpu, *, capacity=None, max_freq=None, siblings=None, online=None,
              hybrid=None):
    """capacity/max_freq: {cpu: value}; siblings: {cpu: (cpus...)}; hybrid: (p_cpus, e_cpus)."""
    root = os.path.join(HERE, name)
    shutil.rmtree(root, ignore_errors=True)
    cpu_root = os.path.join(root, "devices", "system", "cpu")
    all_cpus = range(ncpu)
    online = set(all_cpus) if online is None else set(online)
    _write(os.path.join(cpu_root, "possible"), cpulist(all_cpus))
    _write(os.path.join(cpu_root, "present"), cpulist(all_cpus))
    _write(os.path.join(cpu_root, "online"), cpulist(online))
    _write(os.path.join(cpu_root, "offline"), cpulist(set(all_cpus) - online))
    for cpu in all_cpus:
        d = os.path.join(cpu_root, f"cpu{cpu}")
        os.makedirs(d, exist_ok=True)
        if cpu != 0:  # cpu0 is not hot-pluggable on most platforms: no "online" file
            _write(os.path.join(d, "online"), "1" if cpu in online else "0")
        if capacity is not None:  # cpu_capacity stays visible while a CPU is offline
            _write(os.path.join(d, "cpu_capacity"), str(capacity[cpu]))
        if cpu not in online:  # the kernel removes topology/ and the cpufreq link on offline
            continue
        if max_freq is not None:
            _write(os.path.join(d, "cpufreq", "cpuinfo_max_freq"), str(max_freq[cpu]))
        sib = siblings[cpu] if siblings is not None else (cpu,)
        _write(os.path.join(d, "topology", "thread_siblings_list"), cpulist(sib))
    if hybrid is not None:
        p, e = hybrid
        _write(os.path.join(root, "devices", "cpu_core", "cpus"), cpulist(p))
        _write(os.path.join(root, "devices", "cpu_atom", "cpus"), cpulist(e))


def main() -> None:
    # Rockchip RK3588: 4x Cortex-A55 (cpu0-3) + 2x2 Cortex-A76 (cpu4-5, cpu6-7).
    rk_cap = {c: 530 if c < 4 else 1024 for c in range(8)}
    rk_freq = {**{c: 1800000 for c in range(4)}, 4: 2400000, 5: 2400000, 6: 2256000, 7: 2256000}
    make_tree("rk3588", 8, capacity=rk_cap, max_freq=rk_freq)
    make_tree("rk3588_cpu3_offline", 8, capacity=rk_cap, max_freq=rk_freq,
              online=[0, 1, 2, 4, 5, 6, 7])

    # Snapdragon 8 Gen 2 (SM8550): 3x A510 (cpu0-2), 2x A715 (cpu3-4) + 2x A710 (cpu5-6), 1x X3.
    sd_cap = {**{c: 325 for c in range(3)}, **{c: 870 for c in range(3, 7)}, 7: 1024}
    sd_freq = {**{c: 2016000 for c in range(3)}, **{c: 2803200 for c in range(3, 7)}, 7: 3187200}
    make_tree("snapdragon_8gen2", 8, capacity=sd_cap, max_freq=sd_freq)

    # Intel Core i7-1260P (Alder Lake-P): 4 P-cores with HT (cpu0-7) + 8 E-cores (cpu8-15).
    ih_freq = {c: 4700000 if c < 8 else 3400000 for c in range(16)}
    ih_sib = {c: ((c & ~1, c | 1) if c < 8 else (c,)) for c in range(16)}
    make_tree("intel_hybrid", 16, max_freq=ih_freq, siblings=ih_sib,
              hybrid=(range(0, 8), range(8, 16)))

    # Generic Xeon-style server: 4 cores x 2 threads, siblings (0,4),(1,5),(2,6),(3,7).
    sv_freq = {c: 3000000 for c in range(8)}
    sv_sib = {c: (c % 4, c % 4 + 4) for c in range(8)}
    make_tree("server", 8, max_freq=sv_freq, siblings=sv_sib)


if __name__ == "__main__":
    main()
