"""What a new user meets first: the system packages `make demo` / `make test` install
(scripts/install-system-packages.sh) and an install without an onnxruntime extra."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install-system-packages.sh"


@pytest.fixture
def restricted_path() -> Iterator[Callable[[list[str]], str]]:
    """restricted_path(tools): a PATH holding only these tools (links to the real ones), as on a
    machine without the rest. In the system's temporary directory: another user must reach it."""
    with tempfile.TemporaryDirectory(prefix="genserve-path-") as directory:
        os.chmod(directory, 0o755)
        yield lambda tools: link_tools(Path(directory), tools)


def link_tools(bin_dir: Path, tools: list[str]) -> str:
    for tool in tools:
        # python3.11: the interpreter running the tests itself (a pyenv shim on PATH would need pyenv).
        real = os.path.realpath(sys.executable) if tool == "python3.11" else shutil.which(tool)
        assert real is not None, f"{tool} is needed by this test"
        (bin_dir / tool).symlink_to(real)
    return str(bin_dir)


def run_script(target: str, path: str, uid: int | None = None) -> subprocess.CompletedProcess:
    """Run the script with PATH `path` (a restricted_path directory), as user `uid` if given. It runs
    from a copy beside the tools: the checkout may be unreadable to another user (a mktemp -d clone)."""
    env = {"PATH": path, "PYTHON": "python3.11", "HOME": "/nonexistent"}
    script = Path(path) / SCRIPT.name
    if not script.exists():
        shutil.copyfile(SCRIPT, script)
        script.chmod(0o644)
    command = ["bash", str(script), target]
    if uid is not None:
        command = [shutil.which("setpriv") or "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


BASE_TOOLS = ["bash", "id", "python3.11"]


def test_missing_test_packages_without_root_or_sudo_name_the_command(restricted_path) -> None:
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to run the script as another user")
    path = restricted_path(["bash", "id", "apt-get"])  # apt-get but no sudo, no python3.11
    result = run_script("test", path, uid=65534)  # as nobody
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    packages = "python3 python3-venv prometheus docker-compose docker.io debootstrap"
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"genserve: missing system packages {packages}; run: sudo bash -c '")
    assert f"apt-get install -y --no-install-recommends {packages}'" in lines[0]


def test_the_demo_needs_only_python_and_venv(restricted_path) -> None:
    path = restricted_path(BASE_TOOLS)  # no prometheus, docker or apt-get here
    result = run_script("demo", path)
    assert (result.returncode, result.stderr) == (0, "")


def test_without_apt_get_it_names_the_debian_packages(restricted_path) -> None:
    result = run_script("test", restricted_path(BASE_TOOLS))
    assert result.returncode == 1
    assert result.stderr.strip() == ("genserve: missing system packages (Debian names): prometheus docker-compose "
                                     "docker.io debootstrap; install them with your package manager")


def test_an_unknown_target_is_refused(restricted_path) -> None:
    result = run_script("deploy", restricted_path(BASE_TOOLS))
    assert result.returncode == 2 and "the target is demo or test, not deploy" in result.stderr


@pytest.mark.parametrize(("module", "prog", "args"), [
    ("genserve.export.cli", "genserve-export", ["runs/x", "--repository", "{tmp}/repository"]),
    ("genserve.serving.cli", "genserve-serve", ["--repository", "{tmp}/repository", "--port", "0"]),
])
def test_without_onnxruntime_the_commands_say_which_extra_to_install(module: str, prog: str, args: list[str],
                                                                     tmp_path: Path) -> None:
    # `import onnxruntime` fails in the child as in an install without the extra (None in sys.modules
    # makes the import raise ModuleNotFoundError naming onnxruntime); then the console script's main().
    code = (f"import sys; sys.modules['onnxruntime'] = None; sys.argv[0] = {prog!r}; "
            f"from {module} import main; sys.exit(main())")
    argv = [a.format(tmp=tmp_path) for a in args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"{prog}: error: onnxruntime is not installed")
    assert "genserve[cpu]" in result.stderr and "genserve[gpu]" in result.stderr
    assert not (tmp_path / "repository").exists()  # it stopped before doing anything
