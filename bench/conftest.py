"""Prints each benchmark's throughput as a ratio to its ceiling from the same run.

Benchmarks come in groups: one named ``ceiling:...`` and the subjects
measured against it. Ratios use medians.
"""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ANN001 - pytest hook
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group or "", []).append(bench)
    terminalreporter.section("kvstore: ratios to the ceiling measured in the same run")
    for group, benches in sorted(groups.items()):
        ceilings = [b for b in benches if b.name.split("[")[0].endswith("_ceiling")]
        for bench in benches:
            median = bench.stats.median
            if ceilings and bench not in ceilings:
                ratio = ceilings[0].stats.median / median
                terminalreporter.write_line(
                    f"{group:<18} {bench.name:<44} median {median * 1e3:8.3f} ms   "
                    f"ratio to {ceilings[0].name}: {ratio:5.2f}")
            else:
                terminalreporter.write_line(f"{group:<18} {bench.name:<44} median {median * 1e3:8.3f} ms")
