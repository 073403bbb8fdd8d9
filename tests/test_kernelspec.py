"""`jupyter chronos install-kernel` and install_kernel(): real kernelspec directories, real `jupyter` CLI."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from chronos.errors import InvalidRequestError
from chronos_jupyter.kernelspec import install_kernel, kernel_json, main


@pytest.fixture
def jupyter_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "JUPYTER_PATH": str(tmp_path / "prefix" / "share" / "jupyter"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTER_PLATFORM_DIRS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return dict(os.environ)


def jupyter(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("jupyter", path=os.path.dirname(sys.executable)) or "jupyter"
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=60)


def test_cli_installs_a_kernelspec_that_jupyter_lists(jupyter_env: dict[str, str], tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    done = jupyter("chronos", "install-kernel", "--name", "gpu-8g", "--memory", "8G", "--time", "2h",
                   "--display-name", "GPU 8G (2h)", "--prefix", str(prefix), env=jupyter_env)
    assert done.returncode == 0, done.stderr
    spec_dir = prefix / "share" / "jupyter" / "kernels" / "gpu-8g"
    assert done.stdout.strip() == f"Installed kernelspec gpu-8g in {spec_dir}"

    listed = jupyter("kernelspec", "list", "--json", env=jupyter_env)
    assert listed.returncode == 0, listed.stderr
    specs = json.loads(listed.stdout)["kernelspecs"]
    assert Path(specs["gpu-8g"]["resource_dir"]) == spec_dir
    spec = specs["gpu-8g"]["spec"]
    assert spec["display_name"] == "GPU 8G (2h)"
    assert Path(spec["argv"][0]).resolve() == Path(sys.executable).resolve()
    assert spec["argv"][1:] == ["-m", "ipykernel_launcher", "-f", "{connection_file}"]
    assert spec["metadata"]["kernel_provisioner"] == {
        "provisioner_name": "chronos", "config": {"memory": "8G", "duration": "2h"},
    }


def test_cli_writes_every_setting(jupyter_env: dict[str, str], tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    done = jupyter("chronos", "install-kernel", "--name", "Pair-40G", "--memory", "40G", "--time", "90m",
                   "--gpus", "2", "--priority", "high", "--wait", "10m", "--on-expiry", "kill",
                   "--cull-idle", "30m", "--prefix", str(prefix), env=jupyter_env)
    assert done.returncode == 0, done.stderr
    doc = json.loads((prefix / "share" / "jupyter" / "kernels" / "pair-40g" / "kernel.json").read_text())
    assert doc["metadata"]["kernel_provisioner"]["config"] == {
        "memory": "40G", "duration": "1h30m", "gpus": 2, "priority": "high", "wait": "10m", "on_expiry": "kill",
    }
    assert doc["metadata"]["cull_idle_timeout"] == 1800
    assert doc["display_name"] == (
        "Python 3 (2 GPUs x 40 GiB, 1h 30m, high priority, waits up to 10m, culled after 30m idle, kill at the end)"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--memory", "8Q"], "cannot read memory '8Q'"),
        (["--memory", "8G", "--time", "2x"], "cannot read duration '2x'"),
        (["--memory", "8G", "--gpus", "0"], "invalid --gpus 0"),
        (["--memory", "8G", "--gpus", "2", "--device", "0"], "give either --gpus (how many) or --device"),
        (["--memory", "8G", "--wait", "soon"], "cannot read duration 'soon'"),
        (["--memory", "150%"], "memory fraction '150%' must be above 0 and at most 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(jupyter_env: dict[str, str], tmp_path: Path,
                                          args: list[str], message: str) -> None:
    prefix = tmp_path / "prefix"
    done = jupyter("chronos", "install-kernel", "--name", "bad", *args, "--prefix", str(prefix),
                   env=jupyter_env)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jupyter chronos: error: ") and message in lines[0], lines
    assert not (prefix / "share" / "jupyter" / "kernels" / "bad").exists()


def test_bad_name_is_refused(jupyter_env: dict[str, str], tmp_path: Path) -> None:
    code = main(["install-kernel", "--name", "gpu 8g", "--memory", "8G", "--prefix", str(tmp_path)])
    assert code == 2


def test_user_install_goes_to_the_jupyter_data_dir(jupyter_env: dict[str, str]) -> None:
    path = install_kernel("mine", "4G", "1h", user=True)
    assert Path(path) == Path(jupyter_env["JUPYTER_DATA_DIR"]) / "kernels" / "mine"
    doc = json.loads((Path(path) / "kernel.json").read_text())
    assert doc["metadata"]["kernel_provisioner"]["config"] == {"memory": "4G", "duration": "1h"}


def test_reinstall_replaces_the_spec(jupyter_env: dict[str, str], tmp_path: Path) -> None:
    first = install_kernel("gpu", "4G", "1h", prefix=tmp_path)
    second = install_kernel("gpu", "16G", "1h", prefix=tmp_path)
    assert first == second
    doc = json.loads((Path(second) / "kernel.json").read_text())
    assert doc["metadata"]["kernel_provisioner"]["config"]["memory"] == "16G"


def test_install_locations_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="at most one of --user, --sys-prefix and --prefix"):
        install_kernel("x", "1G", user=True, prefix=tmp_path)


def test_kernel_json_keeps_the_admins_spelling_and_normalises_durations() -> None:
    doc = kernel_json(memory="50%", duration=5400, display_name="half", wait=True, device="0,1")
    config = doc["metadata"]["kernel_provisioner"]["config"]
    assert config == {"memory": "50%", "duration": "1h30m", "wait": True, "device": [0, 1]}
    other = kernel_json(memory="1G", duration="1h30m", display_name="x", python="/opt/py")
    assert other["metadata"]["kernel_provisioner"]["config"]["duration"] == "1h30m"
    assert other["argv"][0] == "/opt/py"


def test_help_lists_the_command() -> None:
    done = subprocess.run([sys.executable, "-m", "chronos_jupyter.kernelspec", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "install-kernel" in done.stdout


def test_help_to_a_reader_that_went_away_is_exit_1_and_no_traceback() -> None:
    """The same rule as ``chronos``'s own (:func:`chronos.cli.exit_code_of`): a closed pipe is an exit code."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered: the flush at exit fails
    proc = subprocess.Popen([sys.executable, "-m", "chronos_jupyter.kernelspec", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1 and err == "", err


def _modes(top: Path) -> dict[str, int]:
    return {str(p.relative_to(top)): p.stat().st_mode & 0o7777 for p in [top, *sorted(top.rglob("*"))]}


@pytest.mark.parametrize("how", ["cli-prefix", "cli-sys-prefix", "python"])
def test_a_kernelspec_installed_under_umask_077_is_readable_by_everyone(
    jupyter_env: dict[str, str], tmp_path: Path, how: str
) -> None:
    """An admin's umask and the private staging directory must not hide the kernel from other users."""
    prefix = tmp_path / "prefix"
    if how == "python":
        script = ("import sys; from chronos_jupyter.kernelspec import install_kernel; "
                  "print(install_kernel('gpu-8g', '8G', '2h', prefix=sys.argv[1]))")
        argv = [sys.executable, "-c", script, str(prefix)]
    elif how == "cli-prefix":
        argv = [sys.executable, "-m", "chronos_jupyter.kernelspec", "install-kernel", "--name", "gpu-8g",
                "--memory", "8G", "--prefix", str(prefix)]
    else:  # a throwaway environment whose sys.prefix the installer writes into, seeing this one's packages
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True, timeout=120)
        jupyter_env = {**jupyter_env, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), *site.getsitepackages()])}
        argv = [str(prefix / "bin" / "python"), "-m", "chronos_jupyter.kernelspec", "install-kernel",
                "--name", "gpu-8g", "--memory", "8G", "--sys-prefix"]
    done = subprocess.run(["sh", "-c", 'umask 077 && exec "$@"', "sh", *argv], capture_output=True, text=True,
                          env=jupyter_env, timeout=120)
    assert done.returncode == 0, done.stderr
    share = prefix / "share"
    modes = _modes(share)
    assert modes == {
        ".": 0o755, "jupyter": 0o755, "jupyter/kernels": 0o755, "jupyter/kernels/gpu-8g": 0o755,
        "jupyter/kernels/gpu-8g/kernel.json": 0o644,
    }, {k: oct(v) for k, v in modes.items()}


def test_default_display_names_differ_whenever_a_setting_does(tmp_path: Path) -> None:
    """Two kernels that behave differently never look alike in the launcher."""
    variants: dict[str, dict[str, object]] = {
        "plain": {}, "wait": {"wait": "15m"}, "wait-forever": {"wait": True}, "cull": {"cull_idle": "30m"},
        "cull-other": {"cull_idle": "1h"}, "expiry": {"on_expiry": "kill"}, "expiry-warn": {"on_expiry": "warn"},
        "high": {"priority": "high"}, "device": {"device": 1}, "pair": {"gpus": 2},
        "idle": {"idle_after": "20m"}, "idle-stop": {"idle_after": "20m", "on_idle": "terminate"},
    }
    names = {}
    for name, options in variants.items():
        path = install_kernel(name, "8G", "2h", prefix=tmp_path, **options)  # type: ignore[arg-type]
        names[name] = json.loads((Path(path) / "kernel.json").read_text())["display_name"]
    assert len(set(names.values())) == len(variants), names
    assert names["plain"] == "Python 3 (GPU 8 GiB, 2h)"
    assert names["wait"] == "Python 3 (GPU 8 GiB, 2h, waits up to 15m)"
    assert names["wait-forever"] == "Python 3 (GPU 8 GiB, 2h, waits for a free GPU)"
    assert names["cull"] == "Python 3 (GPU 8 GiB, 2h, culled after 30m idle)"
    assert names["expiry"] == "Python 3 (GPU 8 GiB, 2h, kill at the end)"
    assert names["device"] == "Python 3 (GPU 1: 8 GiB, 2h)"
