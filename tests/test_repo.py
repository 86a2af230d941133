"""The README's commands are the ones CI runs."""
import re

from conftest import ROOT


def commands(text):
    return re.findall(r"```sh\n(.*?)\n```", text, re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    main_job, tests = commands(readme)[:2]
    assert "attngen build variants/*.yaml" in main_job
    test_command = tests.split(" && ", 1)[1]            # after the install step
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def _device_script(tmp_path, pytest_status, out=True):
    """scripts/device.sh's `tests` step with stand-ins for the GPU machine's python and
    nvidia-smi (shell functions from .gpu/env.sh): pytest exits ``pytest_status``."""
    import os
    import subprocess

    (tmp_path / ".gpu").mkdir(parents=True)
    (tmp_path / ".gpu" / "env.sh").write_text(
        f'python() {{ if [ "$2" = pytest ]; then return {pytest_status}; fi; return 0; }}\n'
        'nvidia-smi() { :; }\n')
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "ATTNGEN_CACHE_DIR")}
    env["TMPDIR"] = str(tmp_path)
    if out:
        env["OUT"] = str(tmp_path / "out")
    return subprocess.run(["bash", str(ROOT / "scripts" / "device.sh"), "tests"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)


def test_device_script_fails_when_the_tests_fail(tmp_path):
    failed = _device_script(tmp_path / "a", 1)
    assert failed.returncode != 0 and "pytest failed (exit 1)" in failed.stdout
    assert _device_script(tmp_path / "b", 0).returncode == 0


def test_scripts_write_no_fixed_tmp_paths(tmp_path):
    run = _device_script(tmp_path, 0, out=False)
    assert run.returncode == 0
    made = run.stdout.split("logs in ", 1)[1].split()[0]
    assert made.startswith(str(tmp_path / "attngen-out.")) and (tmp_path / made).is_dir()
    for path in [*(ROOT / "scripts").iterdir(), *(ROOT / "attngen").rglob("*.py")]:
        assert not re.search(r"""['"=\s]/tmp/""", path.read_text()), path
