"""scripts/fleet-sim at the smallest scale: it runs, restarts the broker and reports every uplink back."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fleet_sim.py"


def test_fleet_sim_small_run(tmp_path, mosquitto_binary):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--uplinks", "5", "--observe", "3", "--min-delay", "0.5", "--work", str(tmp_path / "fleet")],
        capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["uplinks"] == 5
    assert summary["reconnected"] == 5
    assert "second  attempts  connected" in result.stdout
