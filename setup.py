"""Ships the step notebooks inside the wheel, so an installed (non-editable) emalib can run them.

The top-level notebooks/ folder stays their one source: build_py copies it into the build's emalib/notebooks/,
where `emalib.cli.notebook_path` looks first. Everything else is configured in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

NOTEBOOKS = Path("notebooks")  # setuptools runs from the project (or unpacked sdist) folder


class BuildPyWithNotebooks(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads notebooks/ in place
            return
        target = Path(self.build_lib) / "emalib" / "notebooks"
        self.mkpath(str(target))
        for notebook in self._notebooks():
            self.copy_file(str(notebook), str(target / notebook.name))

    def get_outputs(self, include_bytecode=True):
        # Listed so `install` records the copies (and uninstalls them).
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        target = Path(self.build_lib) / "emalib" / "notebooks"
        return outputs + [str(target / notebook.name) for notebook in self._notebooks()]

    @staticmethod
    def _notebooks() -> list[Path]:
        notebooks = sorted(NOTEBOOKS.glob("*.ipynb"))
        if not notebooks:
            raise FileNotFoundError(f"{NOTEBOOKS.resolve()}: no step notebooks to package")
        return notebooks


setup(cmdclass={"build_py": BuildPyWithNotebooks})
