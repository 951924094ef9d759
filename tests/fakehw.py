"""Fake sysfs and /proc trees for the hardware facts a test machine cannot provide.

The agent reads temperatures below ``thermal.sysfs_root`` and the entropy
counters below ``entropy.proc_root``, so tests point those at these trees.
"""

from pathlib import Path


class FakeSysfs:
    """A sysfs tree with thermal zones, written by the test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def zone(self, index: int, kind: str, temp: str) -> Path:
        """Create ``class/thermal/thermal_zone<index>`` and return the path of its ``temp`` file."""
        folder = self.root / "class" / "thermal" / f"thermal_zone{index}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "type").write_text(kind + "\n")
        path = folder / "temp"
        path.write_text(temp + "\n")
        return path


class FakeProc:
    """``sys/kernel/random`` below a fake /proc root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / "sys" / "kernel" / "random"
        self.folder.mkdir(parents=True, exist_ok=True)

    def set(self, entropy_avail: int, poolsize: int) -> "FakeProc":
        (self.folder / "entropy_avail").write_text(f"{entropy_avail}\n")
        (self.folder / "poolsize").write_text(f"{poolsize}\n")
        return self
