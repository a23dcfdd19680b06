"""A real `ray job submit` of jobs/sweep.py, with the command the README documents, against a
local Ray head (dashboard on 127.0.0.1); MLflow must then hold the sweep and the registered
ensemble, and the registered model must load as a Predictor."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from mirage.config import load_config, resolve_paths
from mirage.ports import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 900


def readme_submit_command() -> list[str]:
    """The `ray job submit ...` command of the README's Kubernetes section, as argv."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Run on Kubernetes\n(.*?)(?=^## |\Z)", text, re.M | re.S).group(1)
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("ray job submit"))
    cmd = []
    for line in lines[start:]:
        cmd.append(line.strip().rstrip("\\").strip())
        if not line.rstrip().endswith("\\"):
            break
    return shlex.split(" ".join(cmd))


def test_readme_command_is_complete():
    argv = readme_submit_command()
    assert argv[:3] == ["ray", "job", "submit"] and "--" in argv
    head = argv[: argv.index("--")]
    assert head[head.index("--working-dir") + 1] == "."
    import json

    env = json.loads(head[head.index("--runtime-env-json") + 1])
    assert {".git", "outputs", ".venv"} <= set(env["excludes"])
    assert argv[argv.index("--") + 1 : argv.index("--") + 5] == ["python", "jobs/sweep.py", "--config", "paper"]


@pytest.fixture(scope="module")
def ray_head():
    """A private Ray head on 127.0.0.1 (`ray start --head --block`), stopped by signalling its own process group."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    dash = free_port()
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--temp-dir={temp}", "--num-cpus=8", "--include-dashboard=true",
    ]
    log = open(Path(temp) / "ray_start.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}: {(Path(temp) / 'ray_start.log').read_text()[-2000:]}")
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.time() > deadline:
                    raise TimeoutError(f"the Ray dashboard at {address} did not come up")
                time.sleep(1)
        yield address, env
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_sweep_job_submitted_as_documented(ray_head, tmp_path):
    from mirage.data.synth import write_synthetic

    address, env = ray_head
    out = tmp_path / "outputs"
    overrides = [
        f"outputs={out}", f"data.root={out / 'data'}", f"features.store={out / 'features'}",
        f"train.storage={out / 'ray_results'}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
        "data.synth.seasons=[1, 6, 7]", "data.synth.episodes=1", "data.synth.movies=[life]",
        "data.synth.ood_movies=[chaplin]", "data.synth.seconds=40", "data.synth.parcels=32", "data.n_parcels=32",
        "data.window_trs=8", "data.stride_trs=8",
        "sweep.name=job-test", "sweep.num_samples=2", "sweep.max_concurrent=2", "sweep.n_startup_trials=2",
        "sweep.grace_period=1", "train.epochs=1", "sweep.trial_runner=trainer",
        "ensemble.n_members=2", "ensemble.top_k=2", "ensemble.registry_name=mirage-jobtest",
    ]
    cfg = resolve_paths(load_config("demo", overrides))
    write_synthetic(cfg.data.root, cfg.data.synth, tr=cfg.data.tr)  # a job on a cluster never invents data

    argv = readme_submit_command()
    head = argv[: argv.index("--")]
    head[head.index("--address") + 1] = address
    sid = f"mirage-test-{uuid.uuid4().hex[:8]}"
    job = [str(BIN / "ray"), *head[1:], "--submission-id", sid, "--",
           "python", "jobs/sweep.py", "--config", "demo", "--skip-analysis"]
    for o in overrides:
        job += ["--set", o]
    proc = subprocess.run(job, cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    status = client.get_job_status(sid)
    logs = client.get_job_logs(sid)
    assert status == JobStatus.SUCCEEDED, f"job {sid} {status}:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}\n{logs[-4000:]}"
    assert proc.returncode == 0

    from mirage.tracking import client as mlflow_client
    from mirage.tracking.models import load_predictor

    c = mlflow_client(cfg.tracking.uri)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    runs = c.search_runs([exp.experiment_id], max_results=100)
    kinds = {}
    for r in runs:
        kinds.setdefault(r.data.tags.get("mirage.kind"), []).append(r)
    (sweep,) = kinds["sweep"]
    assert sweep.info.status == "FINISHED"
    trials = [r for r in kinds["trial"] if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id]
    assert len(trials) == 2 and all(r.info.status in ("FINISHED", "KILLED") for r in trials)
    assert any("val_r" in r.data.metrics for r in trials)
    ens = kinds["ensemble"]
    assert ens and ens[-1].info.status == "FINISHED"
    assert not [r for r in runs if r.info.status == "RUNNING"], "every run the job opened must be closed"

    version = c.get_model_version_by_alias("mirage-jobtest", cfg.ensemble.alias)
    assert version.version
    p = load_predictor("models:/mirage-jobtest@champion", tracking_uri=cfg.tracking.uri, device="cpu")
    assert len(p.members) == 2 and p.n_parcels == 32
