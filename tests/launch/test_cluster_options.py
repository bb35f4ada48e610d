"""What a real cluster needs from the launchers, checked without SLURM, docker or a registry:
launch/slurm.sbatch's network and container options (through HMTRAIN_DRY_RUN=1, and through a stand-in
`srun` that records what it was given), `launch/install.sh --system-torch` refusing what it cannot keep,
and the GPU images carrying the RDMA libraries and the NVML bindings."""
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.launch.conftest import REPO, SLURM_SBATCH

INSTALL_SH = REPO / "launch" / "install.sh"
NETWORK_VARS = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_IB_HCA")


def job_env(**options: str) -> dict[str, str]:
    """A two-node job's SLURM variables, none of the options under test unless given."""
    env = {k: v for k, v in os.environ.items() if k not in NETWORK_VARS and not k.startswith("HMTRAIN_")}
    return {**env, "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_CPUS_ON_NODE": "8",
            "SLURM_JOB_NODELIST": "node[1-2]", "HMTRAIN_NPROC_PER_NODE": "4", "HMTRAIN_RDZV_HOST": "10.1.0.1",
            **options}


def sbatch_script(tmp_path: Path, env: dict[str, str], run_dir: str = "/shared/runs/a"):
    return subprocess.run(["bash", str(SLURM_SBATCH), "train", "--config", "tiny", f"train.run_dir={run_dir}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def dry_run(tmp_path: Path, **options: str) -> tuple[list[str], str]:
    """The command line the dry run prints, as words, and its whole output."""
    proc = sbatch_script(tmp_path, job_env(HMTRAIN_DRY_RUN="1", **options))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    marker = next(i for i, line in enumerate(lines) if "dry run (HMTRAIN_DRY_RUN=1)" in line)
    return shlex.split(lines[marker + 1]), proc.stdout


def test_dry_run_leaves_the_interfaces_to_nccl_and_gloo_unless_asked(tmp_path):
    words, out = dry_run(tmp_path)
    assert words[0] == "srun" and "-m" in words and "hmtrain.cli" in words, words
    assert not any(var in out for var in NETWORK_VARS), out
    assert "HMTRAIN_NET_IFNAME unset" in out
    assert not any(word.startswith("--container") for word in words), words
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


def test_dry_run_sets_the_interface_for_nccl_and_gloo(tmp_path):
    # lo: the names must exist on the node (every machine has lo); NCCL_IB_HCA goes to NCCL as given
    words, out = dry_run(tmp_path, HMTRAIN_NET_IFNAME="lo,lo", HMTRAIN_IB_HCA="mlx5_0,mlx5_1")
    prefix = words[:words.index("srun")]
    assert prefix == ["NCCL_SOCKET_IFNAME=lo,lo", "GLOO_SOCKET_IFNAME=lo,lo", "NCCL_IB_HCA=mlx5_0,mlx5_1"]
    assert "network: NCCL_SOCKET_IFNAME=lo,lo GLOO_SOCKET_IFNAME=lo,lo NCCL_IB_HCA=mlx5_0,mlx5_1" in out


def test_dry_run_runs_each_node_in_the_container_image(tmp_path):
    (tmp_path / ".venv" / "bin").mkdir(parents=True)  # the submit directory's .venv is not in the image
    (tmp_path / ".venv" / "bin" / "python").symlink_to(sys.executable)
    words, _ = dry_run(tmp_path, HMTRAIN_CONTAINER_IMAGE="/images/hmtrain-ngc.sqsh",
                       HMTRAIN_CONTAINER_MOUNTS="/shared:/shared")
    launcher = words.index("bash")
    assert "--container-image=/images/hmtrain-ngc.sqsh" in words[:launcher], words
    assert "--container-mounts=/shared:/shared" in words[:launcher], words
    assert words[launcher + 3] == "python3", words  # bash -c SCRIPT PYTHON: the image's python3


def test_srun_gets_the_network_settings_and_the_image(tmp_path):
    """Not a dry run: a stand-in srun on PATH records its arguments and environment."""
    bin_dir, record = tmp_path / "bin", tmp_path / "srun.txt"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\n{ printf "arg %s\\n" "$@"; env | grep -E "^(NCCL|GLOO)_"; } '
                                  f'> {record}\n')
    (bin_dir / "srun").chmod(0o755)
    env = job_env(HMTRAIN_NET_IFNAME="lo", HMTRAIN_CONTAINER_IMAGE="/images/hmtrain.sqsh")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    proc = sbatch_script(tmp_path, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = record.read_text().splitlines()
    assert {"NCCL_SOCKET_IFNAME=lo", "GLOO_SOCKET_IFNAME=lo"} <= set(got), got
    assert "arg --container-image=/images/hmtrain.sqsh" in got and "arg train.run_dir=/shared/runs/a" in got, got
    assert "srun ended with exit code 0" in proc.stdout


@pytest.mark.parametrize("options, run_dir, message", [
    ({"HMTRAIN_NET_IFNAME": "^docker,lo"}, "/shared/r",
     "HMTRAIN_NET_IFNAME must be interface names separated by commas (e.g. ib0 or eth0,eth1), got '^docker,lo'"),
    ({"HMTRAIN_NET_IFNAME": "lo,no-such-if0"}, "/shared/r", "HMTRAIN_NET_IFNAME: no interface 'no-such-if0' on "),
    ({"HMTRAIN_CONTAINER_MOUNTS": "/shared:/shared"}, "/shared/r",
     "HMTRAIN_CONTAINER_MOUNTS is set but HMTRAIN_CONTAINER_IMAGE is not"),
    ({"HMTRAIN_CONTAINER_IMAGE": "/images/h.sqsh"}, "runs/r",
     "with HMTRAIN_CONTAINER_IMAGE, train.run_dir must be an absolute path"),
])
def test_bad_cluster_options_stop_the_job_in_one_line(tmp_path, options, run_dir, message):
    proc = sbatch_script(tmp_path, job_env(HMTRAIN_DRY_RUN="1", **options), run_dir=run_dir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"slurm.sbatch: error: {message}" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "srun" not in proc.stdout


# --- launch/install.sh --system-torch -------------------------------------------------------------------

def repo_copy(tmp_path: Path, requirements: str) -> Path:
    """install.sh works in the repository it sits in (and makes .venv there): give it a scratch one."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / "launch" / "install.sh").write_text(INSTALL_SH.read_text())
    (repo / "requirements.txt").write_text(requirements)
    (repo / "requirements-dev.txt").write_text("-r requirements.txt\n")
    return repo


def offline_env(**extra: str) -> dict[str, str]:
    """pip with no index and no configuration: whatever it needs must come from the test's own wheels."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def test_system_torch_without_torch_is_refused_before_anything_is_made(tmp_path):
    no_torch = tmp_path / "no-torch"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(no_torch)], check=True, timeout=120)
    repo = repo_copy(tmp_path, "torch==2.13.0\n")
    proc = subprocess.run(["bash", str(repo / "launch" / "install.sh"), "--system-torch"], capture_output=True,
                          text=True, env=offline_env(PYTHON=str(no_torch / "bin" / "python")), timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "launch/install.sh: error: --system-torch keeps the torch that PYTHON=" in proc.stderr
    assert "has no importable torch (ModuleNotFoundError: No module named 'torch')" in proc.stderr
    assert not (repo / ".venv").exists()


def hand_made_wheel(directory: Path, name: str, requires: str) -> None:
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(directory / f"{name}-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{info}/METADATA",
                     f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\nRequires-Dist: {requires}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


def test_system_torch_refuses_a_requirement_that_wants_another_torch(tmp_path):
    # the torch to keep: a stand-in 2.13.0 on PYTHONPATH, which both Pythons below import
    kept = tmp_path / "kept"
    (kept / "torch").mkdir(parents=True)
    (kept / "torch" / "__init__.py").write_text('__version__ = "2.13.0"\n')
    (kept / "torch-2.13.0.dist-info").mkdir()
    (kept / "torch-2.13.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    hand_made_wheel(wheels, "needs_other_torch", "torch==9.9")
    repo = repo_copy(tmp_path, "torch==2.13.0\nneeds_other_torch==1.0\n")
    # a .venv that sees the base Python's pip, so that nothing is installed to get one
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(repo / ".venv")],
                   check=True, timeout=120)
    env = offline_env(PYTHON=str(repo / ".venv" / "bin" / "python"), PYTHONPATH=str(kept), PIP_FIND_LINKS=str(wheels))
    proc = subprocess.run(["bash", str(repo / "launch" / "install.sh"), "--system-torch"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "needs-other-torch 1.0 depends on torch==9.9" in proc.stderr
    assert "launch/install.sh: error: --system-torch: the requirements cannot be installed beside torch==2.13.0" \
        in proc.stderr
    assert not list((repo / ".venv").glob("lib/python*/site-packages/torch*")), "pip installed a torch"


# --- the GPU images ---------------------------------------------------------------------------------------

def apt_packages(dockerfile: Path) -> set[str]:
    text = dockerfile.read_text().replace("\\\n", " ")
    return {word for match in re.findall(r"apt-get install ([^&;]*)", text) for word in match.split()
            if not word.startswith("-")}


def test_the_gpu_images_carry_the_rdma_libraries_and_nvml():
    assert {"rdma-core", "libibverbs1", "ibverbs-providers", "librdmacm1"} <= apt_packages(REPO / "docker" /
                                                                                         "Dockerfile.gpu")
    gpu = (REPO / "docker" / "Dockerfile.gpu").read_text()
    assert "launch/install.sh --gpu" in gpu and "import torch, triton, pynvml" in gpu
    ngc = (REPO / "docker" / "Dockerfile.ngc").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\$\{NGC_TAG\}$", ngc, re.M)
    assert "launch/install.sh --system-torch --gpu" in ngc and "import torch, triton, pynvml" in ngc
    # install.sh --gpu is where nvidia-ml-py comes from, pinned, and only with --gpu
    install = INSTALL_SH.read_text()
    assert re.search(r'if \[ \$gpu = 1 \]; then\n(  #.*\n)*  .*pip install .*"nvidia-ml-py==[0-9.]+"', install)
    cpu_requirements = (REPO / "requirements.txt").read_text().splitlines()
    assert not any(line.startswith("nvidia-ml-py") for line in cpu_requirements)
