"""Build hook: ship the C++/CUDA sources (``csrc/``) inside the package as ``dmd2/_csrc`` so that a non-editable
install can still compile the extension on first use (:mod:`dmd2.kernels.ext_build` looks there first).
Everything else is declared in ``pyproject.toml``."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"
SUFFIXES = (".cpp", ".cu", ".h")


class BuildPyWithCsrc(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install compiles from the checkout's csrc/
            return
        dst = Path(self.build_lib) / "dmd2" / "_csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(CSRC.iterdir()):
            if f.suffix in SUFFIXES:
                shutil.copy2(f, dst / f.name)


setup(cmdclass={"build_py": BuildPyWithCsrc})
