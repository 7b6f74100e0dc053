"""Everything about the package is in pyproject.toml; this file only adds one build step.

The repository keeps themes/, content/ and netlify.toml at its root (where users and Netlify look
for them). When a wheel is built, build_py copies them into the package as sitegen/_data/, so an
installed sitegen ships its default theme, content pages and URL rules (sitegen/resources.py finds
them there, or at the repository root in an editable checkout).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("themes", "content", "netlify.toml", "netlify")  # the same names as sitegen.resources.SHIPPED


class build_py_with_data(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads them from the checkout itself
            return
        target = Path(self.build_lib) / "sitegen" / "_data"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for name in SHIPPED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, target / name)


setup(cmdclass={"build_py": build_py_with_data})
