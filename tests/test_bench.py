"""The benchmark runner still works: its smoke suite, ours and C, 2,000 jobs a scenario."""
import subprocess
import sys

import pytest

from conftest import IMPL, ROOT, unavailable

GEARBENCH = ROOT.parent / "shared" / "bench" / "gearbench.py"


@pytest.mark.skipif(IMPL == "c", reason="runs both servers itself")
def test_benchmark_runner_smoke_suite_passes():
    if not GEARBENCH.exists():
        unavailable(f"the load generator is not at {GEARBENCH}")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--suite", "smoke",
                             "--servers", "ours,c"], capture_output=True, timeout=180, cwd=ROOT)
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, output
    for scenario in ("bg-submit", "bg-drain", "fg", "mixed"):
        assert f"{scenario} [ours 1/1] ok" in output, output


@pytest.mark.skipif(IMPL == "c", reason="runs its own server")
def test_big_suite_runs_the_queue_larger_than_memory_check_at_a_small_scale():
    # The 10 M-job check itself is a benchmark; 2,000 jobs take its every step: submit,
    # kill -9, restart, status, the rare job and the ordered drain.
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--suite", "big",
                             "--jobs", "2000"], capture_output=True, timeout=120, cwd=ROOT)
    output = result.stdout.decode() + result.stderr.decode()
    assert "huge.py failed" not in output, output
    rows = {line.split("  ")[0]: line.split() for line in output.splitlines()}
    assert rows["jobs drained in exact order"][5] == "520", output   # 10 + 2000/4 + 10
    for figure in ("RSS while full, MB", "status right after kill -9 + restart, s",
                   "rare function's job handed out, ms"):
        assert rows[figure][-1] in ("yes", "NO"), output
