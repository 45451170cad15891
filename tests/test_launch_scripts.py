"""launch/: syntax (bash -n, shellcheck), the JobSet manifest, and what each dry run would run."""
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["local_cpu.sh", "tpu_pod.sh", "slurm_gpu.sbatch", "gke_jobset.sh"]
CONFIG = "configs/gemma2b_instruct.yaml"
OVERRIDES = ["model.source=/mnt/models/gemma-2b", "data.train=my data's.jsonl", "method.peft.targets=[q_proj,v_proj]"]


def _run(args, env=None, timeout=60):
    full_env = {k: v for k, v in os.environ.items() if k != "DRY_RUN"}
    full_env.update({"PYTHON": sys.executable, **(env or {})})
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def _dry(script, *args, env=None):
    out = _run(["bash", os.path.join(LAUNCH, script), "--dry-run", *args], env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _train_args(words):
    """The words after ``train`` in a command line."""
    return words[words.index("train") + 1:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    out = _run(["bash", "-n", os.path.join(LAUNCH, script)])
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    out = _run(["shellcheck", "--shell=bash", os.path.join(LAUNCH, script)])
    assert out.returncode == 0, out.stdout


def test_jobset_manifest_parses_and_matches_a_v5e_16_slice():
    with open(os.path.join(LAUNCH, "gke_jobset.yaml")) as f:
        doc = yaml.safe_load(f)
    assert doc["kind"] == "JobSet" and doc["apiVersion"].startswith("jobset.x-k8s.io/")
    job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = job["template"]["spec"]
    container = pod["containers"][0]
    assert job["parallelism"] == job["completions"] == 4  # v5e-16: 4 hosts x 4 chips
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4"
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    assert container["command"] == ["bitune-jax", "train"]
    assert container["args"][0] == CONFIG and os.path.exists(os.path.join(ROOT, CONFIG))


def test_tpu_pod_dry_run_runs_on_every_worker_with_config_and_overrides():
    out = _dry("tpu_pod.sh", "--tpu", "my-v4-32", "--zone", "us-central2-b", "--project", "proj", CONFIG, *OVERRIDES)
    lines = out.strip().splitlines()
    assert len(lines) == 3, out
    assert lines[0].startswith("git -C ") and " archive " in lines[0]
    copy, ssh = shlex.split(lines[1]), shlex.split(lines[2])
    assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in copy
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4-32"]
    assert {"--worker=all", "--zone=us-central2-b", "--project=proj"} <= set(ssh)
    remote = ssh[ssh.index("--command") + 1]
    assert "python3 -m venv .venv" in remote and "pip install" in remote and "jax[tpu]" in remote
    # The remote command line gives the worker's shell the config and overrides unchanged.
    assert _train_args(shlex.split(remote[remote.rindex("; ") + 2:])) == [CONFIG, *OVERRIDES]


def test_tpu_pod_skip_setup_and_env_dry_run():
    out = _dry("tpu_pod.sh", "--skip-setup", CONFIG, env={"TPU_NAME": "pod", "ZONE": "z", "DRY_RUN": "1"})
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "--worker=all" in lines[0] and "scp" not in lines[0] and "pip install" not in lines[0]


def test_tpu_pod_needs_name_and_zone():
    out = _run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", CONFIG],
               env={"TPU_NAME": "", "ZONE": ""})
    assert out.returncode == 2 and "--tpu" in out.stderr


def test_slurm_dry_run_starts_one_task_per_gpu():
    out = _dry("slurm_gpu.sbatch", CONFIG, *OVERRIDES, env={"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"})
    words = shlex.split(out.strip())
    assert words[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert {"--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8"} <= set(words)
    assert words[words.index("train") - 1].endswith(".venv/bin/bitune-jax")
    assert _train_args(words) == [CONFIG, *OVERRIDES]


def test_slurm_dry_run_per_node_with_setup():
    out = _dry("slurm_gpu.sbatch", CONFIG, env={"SETUP": "1", "PER_NODE": "1", "GPUS_PER_NODE": "4",
                                                "SLURM_JOB_NUM_NODES": "3"})
    lines = out.strip().splitlines()
    assert lines[0] == "python3 -m venv .venv" and "jax[cuda12]" in lines[1]
    assert lines[2] == "export JAX_LOCAL_DEVICE_IDS=0,1,2,3"
    assert {"--nodes=3", "--ntasks-per-node=1", "--gpus-per-node=4"} <= set(shlex.split(lines[3]))


def test_gke_dry_run_renders_the_slice_and_arguments():
    out = _dry("gke_jobset.sh", "--slice", "v4-32", "--image", "img:1", "--name", "run1", "--bucket", "bk",
               CONFIG, *OVERRIDES)
    first, *body, last = out.strip().splitlines()
    assert first == "kubectl apply -f - <<'EOF'" and last == "EOF"
    doc = yaml.safe_load("\n".join(body))
    job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = job["template"]["spec"]
    assert doc["metadata"]["name"] == "run1" and job["parallelism"] == job["completions"] == 4
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v4-podslice",
                                   "cloud.google.com/gke-tpu-topology": "2x2x4"}
    assert pod["containers"][0]["image"] == "img:1"
    assert pod["containers"][0]["args"] == [CONFIG, *OVERRIDES]
    assert pod["volumes"][0]["csi"]["volumeAttributes"]["bucketName"] == "bk"


def test_local_cpu_dry_run_gives_every_process_its_id_and_devices():
    out = _dry("local_cpu.sh", "--port", "23456", "--devices-per-process", "2", "--log-dir", "/tmp/logs",
               "3", CONFIG, *OVERRIDES, env={"XLA_FLAGS": ""})
    lines = out.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("wait")
    for i, line in enumerate(lines[:3]):
        words = shlex.split(line)
        assert words[0] == "env" and "JAX_PLATFORMS=cpu" in words
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in words
        assert {"BITUNE_COORDINATOR=127.0.0.1:23456", "BITUNE_NUM_PROCESSES=3", f"BITUNE_PROCESS_ID={i}"} <= set(words)
        assert words[words.index("-m") + 1] == "bitune_jax.cli"
        assert _train_args(words) == [CONFIG, *OVERRIDES, ">", f"/tmp/logs/process_{i}.log", "2>&1", "&"]


def _fake_python(tmp_path, body):
    """An executable standing in for ``python -m bitune_jax.cli train ...``."""
    path = tmp_path / "fake_python"
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return str(path)


def test_local_cpu_runs_every_process_and_reports_success(tmp_path):
    fake = _fake_python(tmp_path, 'echo "id=$BITUNE_PROCESS_ID n=$BITUNE_NUM_PROCESSES c=$BITUNE_COORDINATOR $*"\n')
    out = _run(["bash", os.path.join(LAUNCH, "local_cpu.sh"), "--log-dir", str(tmp_path / "logs"), "2", CONFIG, "a=1"],
               env={"PYTHON": fake})
    assert out.returncode == 0, out.stderr
    for i in range(2):
        log = (tmp_path / "logs" / f"process_{i}.log").read_text()
        assert f"id={i} n=2 c=127.0.0.1:" in log and f"-m bitune_jax.cli train {CONFIG} a=1" in log
    assert "id=0" in out.stdout  # process 0 is shown on the terminal as well


def test_local_cpu_stops_the_others_when_one_fails(tmp_path):
    # Process 1 fails; process 0 (and the sleep it started) would run for a minute.
    fake = _fake_python(tmp_path, 'if [ "$BITUNE_PROCESS_ID" = 1 ]; then sleep 0.5; exit 3; fi\n'
                                  'sleep 60 & wait\n')
    start = time.time()
    out = _run(["bash", os.path.join(LAUNCH, "local_cpu.sh"), "--log-dir", str(tmp_path / "logs"), "3", CONFIG],
               env={"PYTHON": fake})
    assert out.returncode == 3 and "process 1 exited with status 3" in out.stderr
    assert time.time() - start < 30


def test_local_cpu_timeout(tmp_path):
    fake = _fake_python(tmp_path, "sleep 60\n")
    out = _run(["bash", os.path.join(LAUNCH, "local_cpu.sh"), "--timeout", "1", "--log-dir", str(tmp_path / "logs"),
                "2", CONFIG], env={"PYTHON": fake})
    assert out.returncode == 124 and "timeout" in out.stderr
