"""Packaging metadata lives in pyproject.toml; this file only adds the protobuf code generation hook.

build_py first generates serving/generated/ from protos/ (serving/protos_build.py, needs
grpcio-tools at build time), then packages it with everything else.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithProtos(build_py):
    """build_py that runs `python -m genserve.serving.protos_build` first and ships its output."""

    def run(self) -> None:
        root = Path(__file__).resolve().parent
        # Loaded from its file: the genserve namespace does not exist until the package is installed.
        spec = importlib.util.spec_from_file_location("genserve_protos_build", root / "serving" / "protos_build.py")
        protos_build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(protos_build)
        if protos_build.PROTOS.is_dir():
            try:
                protos_build.build()
            except protos_build.GrpcToolsMissing as error:
                # An isolated build environment without grpcio-tools: serving.protos generates the
                # code on first import instead (grpcio-tools is a runtime dependency too).
                print(f"warning: not generating serving/generated/ now: {error}", file=sys.stderr)
        generated = sorted(
            ".".join(("genserve", *p.parent.relative_to(root).parts))
            for p in (root / "serving" / "generated").rglob("__init__.py")
        )
        self.packages = sorted(set(self.packages or []) | set(generated))
        super().run()


# The four folders install as genserve.training, genserve.export, genserve.serving and genserve.clients,
# so that they cannot collide with other distributions' top-level `training` or `serving` modules.
FOLDERS = ("training", "export", "serving", "clients")

setup(
    cmdclass={"build_py": BuildPyWithProtos},
    package_dir={f"genserve.{folder}": folder for folder in FOLDERS},
    packages=[f"genserve.{name}" for name in find_packages(include=[f"{f}*" for f in FOLDERS])],
)
