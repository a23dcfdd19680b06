"""What a user sees for each common mistake: exit code, seconds, stderr lines, the line that matters.

    .venv/bin/python bench/mistakes.py [--tree DIR] [--timeout 120] [--only NAME ...]

Runs the ``mirage`` command of the source tree ``--tree`` (default: this checkout) once per
mistake, each in a fresh outputs folder under a temp dir, and prints a Markdown table: the
mistake, exit code (``hang`` when it ran past ``--timeout``), wall seconds, how many lines it
wrote to stderr, its last stderr line, and what it left behind (new entries in the outputs
folder). Point ``--tree`` at another checkout (``git worktree add /tmp/old <rev>``) to compare
two versions on the same machine in one sitting.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "data.synth.seasons=[1, 6, 7]", "data.synth.episodes=1", "data.synth.movies=[life]",
    "data.synth.ood_movies=[chaplin]", "data.synth.seconds=20", "data.synth.parcels=16", "data.n_parcels=16",
    "ray.num_cpus=4", "ray.include_dashboard=false",
]


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def mirage(tree: Path, args: list[str], cwd: Path, timeout: float) -> tuple[str, float, str]:
    """Run ``mirage ARGS`` from ``tree``: (exit code or 'hang', seconds, stderr)."""
    code = f"import sys; sys.path.insert(0, {str(tree / 'platform')!r}); from mirage.cli import main; sys.exit(main())"
    env = {**os.environ, "PYTHONPATH": str(tree / "platform")}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = p.communicate(timeout=timeout)
        rc = str(p.returncode)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        rc = "hang"
    return rc, time.perf_counter() - t0, err


def synth(tree: Path, out: Path, timeout: float) -> Path:
    data = out / "data"
    rc, _, err = mirage(tree, ["data", "synth", str(data), "--seconds", "20", *sets(*SMALL[:-2])], out, timeout)
    if rc != "0":
        raise SystemExit(f"could not write the synthetic dataset: {err[-500:]}")
    return data


class _RunsACommand:
    """Unpickling it runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_zip(path: Path, marker: Path) -> Path:
    """A submission zip whose .npy holds a pickled object array that creates ``marker`` when loaded."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.array({"s07e01a": _RunsACommand(marker)}, dtype=object), allow_pickle=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("fmri_predictions_friends_s7.npy", buf.getvalue())
    return path


def scenarios(tree: Path, base: Path, timeout: float):
    """(name, args, folder, note) per mistake; folders are prepared here."""
    def fresh(name: str) -> Path:
        d = base / name
        d.mkdir()
        return d

    data_dir = fresh("dataset")
    data = synth(tree, data_dir, timeout)
    common = sets(*SMALL)

    d = fresh("train-no-store")
    yield "train, no feature store", ["train", *common, *sets(f"outputs={d}", f"data.root={data}")], d
    d = fresh("train-gpu")
    yield "train --set train.use_gpu=true (no GPU)", ["train", *common, *sets(
        f"outputs={d}", f"data.root={data}", "train.use_gpu=true")], d
    d = fresh("predict-bogus")
    yield "predict --model /nonexistent", ["predict", "--model", "/nonexistent", "--split", "friends-s7", "--out", str(d / "p"),
                                          *common, *sets(f"outputs={d}", f"data.root={data}")], d
    d = fresh("serve-bogus")
    yield "serve --model /nonexistent", ["serve", "--model", "/nonexistent", *common, *sets(f"outputs={d}")], d
    d = fresh("truncated")
    copy = d / "data"
    shutil.copytree(data, copy, symlinks=True)
    movie = next(copy.rglob("*.mkv"))
    size = movie.stat().st_size
    with open(movie, "r+b") as f:
        f.truncate(min(5000, size // 4))
    yield f"data check, mkv truncated to 5 KB of {size // 1000} KB", ["data", "check", str(copy), *common], d
    d = fresh("symlink")
    copy = d / "data"
    shutil.copytree(data, copy, symlinks=True)
    bold = next(copy.rglob("*.h5"))
    bold.unlink()
    bold.symlink_to(d / "annex" / "objects" / bold.name)
    yield "data check, an unfetched (broken symlink) fMRI file", ["data", "check", str(copy), *common], d
    d = fresh("evil")
    marker = d / "owned"
    yield "score evil.zip (pickle that runs a command)", ["score", str(evil_zip(d / "evil.zip", marker)), "--split",
                                                          "friends-s7", *sets(f"outputs={d}", f"data.root={data}")], d
    d = fresh("revision")
    yield "--set features.revision=20240101", ["data", "check", str(data), *common, *sets(f"outputs={d}", "features.revision=20240101")], d
    d = fresh("typo")
    yield "--set model.n_querys=8 (typo)", ["data", "check", str(data), *common, *sets(f"outputs={d}", "model.n_querys=8")], d
    d = fresh("preset")
    yield "--config dmeo (typo)", ["data", "check", str(data), "--config", "dmeo", *common], d
    d = fresh("version")
    yield "--version", ["--version"], d
    d = fresh("verify-empty")
    (d / "features").mkdir()
    yield "features verify, no store", ["features", "verify", *common, *sets(f"outputs={d}")], d
    d = fresh("sweep-typo-root")
    yield "sweep --config paper (local), data.root mistyped", ["sweep", "--config", "paper", *common, *sets(
        f"outputs={d}", "ray.address=", "train.use_gpu=false", f"data.root={data}-typo")], d


def left_behind(folder: Path, before: set[str]) -> str:
    new = sorted({p.name for p in folder.iterdir()} - before)
    return ", ".join(new) if new else "nothing"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=ROOT)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of the mistakes to run")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mistakes-", dir="/tmp"))
    print(f"tree {a.tree.resolve()}  load average {os.getloadavg()[0]:.2f}\n")
    print("| mistake | exit | s | stderr lines | last stderr line | left behind |")
    print("|---|---|---|---|---|---|")
    try:
        for name, args, folder in scenarios(a.tree.resolve(), base, a.timeout):
            if a.only and not any(o in name for o in a.only):
                continue
            before = {p.name for p in folder.iterdir()}
            rc, secs, err = mirage(a.tree.resolve(), args, folder, a.timeout)
            lines = [ln for ln in err.splitlines() if ln.strip()]
            last = (lines[-1] if lines else "").replace("|", "\\|")[:160]
            extra = " (the pickle ran)" if (folder / "owned").exists() else ""
            print(f"| {name} | {rc} | {secs:.1f} | {len(lines)} | {last}{extra} | {left_behind(folder, before)} |",
                  flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nload average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
