"""Packaging metadata lives in pyproject.toml; this file only adds the protobuf code generation hook.

build_py first generates serving/generated/ from protos/ (serving/protos_build.py, needs
grpcio-tools at build time), then packages it with everything else.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProtos(build_py):
    """build_py that runs `python -m serving.protos_build` first and ships its output."""

    def run(self) -> None:
        root = Path(__file__).resolve().parent
        sys.path.insert(0, str(root))
        try:
            from serving import protos_build
        finally:
            sys.path.remove(str(root))
        if protos_build.PROTOS.is_dir():
            try:
                protos_build.build()
            except protos_build.GrpcToolsMissing as error:
                # An isolated build environment without grpcio-tools: serving.protos generates the
                # code on first import instead (grpcio-tools is a runtime dependency too).
                print(f"warning: not generating serving/generated/ now: {error}", file=sys.stderr)
        generated = sorted(
            ".".join(p.parent.relative_to(root).parts)
            for p in (root / "serving" / "generated").rglob("__init__.py")
        )
        self.packages = sorted(set(self.packages or []) | set(generated))
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
