"""Only what pyproject.toml cannot say: install tam_hf's start-up hook, tam_hf-register.pth, at the top of
site-packages (see tam_hf/trainer/autoregister.py), from a wheel and from an editable install alike."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = os.path.join("tam_hf", "trainer", "tam_hf-register.pth")


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        # A wheel ships build_lib; an editable wheel ships the install_lib folder it prepares instead.
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(PTH, os.path.join(target, os.path.basename(PTH)), preserve_mode=False)


setup(cmdclass={"build_py": BuildPyWithPth})
