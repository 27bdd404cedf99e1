"""In a clone of the repository, `onepass` is the repository's top-level folder: the package's modules
are the files beside this folder (train.py, datasets.py, ..., algorithms/), so `from onepass import
train` works from the repository without installing it. An installed copy holds those files in its own
`onepass` folder (pyproject.toml) and needs no such pointer."""
from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent.parent)]
