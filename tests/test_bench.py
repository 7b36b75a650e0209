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
