"""The built wheel ships every module, data file and the console script."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_every_module(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(REPO_ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(tmp_path.glob("edge_agent-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())

    sources = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "edge_agent").rglob("*.py"))
    missing = [name for name in sources if name not in names]
    assert not missing, f"modules missing from the wheel: {missing}"
    assert "edge_agent/openssl-tpm2.cnf" in names
    assert any(name.endswith("data/share/edge-agent/systemd/edge-agent.service") for name in names)
    assert any(name.endswith("firmware_profiles/nxp-imx8m.toml") for name in names)
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "edge-agent = edge_agent.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), sorted(names)
