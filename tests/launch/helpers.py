"""What the launcher and SLURM tests share: the `raf` next to this interpreter, a small synthetic cohort, the
loss sequence a run logged."""
import json
import subprocess
import sys
from pathlib import Path

RAF = Path(sys.executable).parent / "raf"


def make_cohort(out: Path, num_subjects: int = 24) -> Path:
    subprocess.run([str(RAF), "synth", "--out", str(out), "--config", "tiny", "--quiet",
                    f"cohort.num_subjects={num_subjects}"], check=True, capture_output=True, timeout=300)
    return out / "cohort.zarr"


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
