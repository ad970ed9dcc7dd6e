"""Every Python block of the README and of docs/*.md runs as written: a file's blocks in order, in one fresh
interpreter, in an empty folder (so the docs cannot rot). A block that needs more says so in an HTML comment right
above it, and runs by itself that way:

- ``<!-- doc-test: torchrun N -->``: under torchrun, with N processes;
- ``<!-- doc-test: in DIR -->``: in a copy of the repository's folder DIR (files the block reads);
- ``<!-- doc-test: mxnet -->``: MXNet 1.9.1's side of a comparison, with ``.mxref/bin/python`` where it exists
  (``make fixtures`` makes it), else not run (the suite never needs MXNet)."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
_BLOCK = re.compile(r"(?:<!-- doc-test: (?P<mark>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(path):
    """(marker or None, code) of every fenced Python block, in order."""
    return [(m.group("mark"), m.group("code")) for m in _BLOCK.finditer(path.read_text())]


def _run(cmd, cwd, timeout=240):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_docs_have_python_blocks():
    assert len(blocks(ROOT / "README.md")) >= 4


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_python_blocks_run_as_written(path, tmp_path):
    found = blocks(path)
    plain = "\n\n".join(code for mark, code in found if mark is None)
    if plain:
        script = tmp_path / "blocks.py"
        script.write_text(plain)
        done = _run([sys.executable, str(script)], tmp_path)
        assert done.returncode == 0, f"{path.name}: its Python blocks fail when run in order:\n{done.stderr[-3000:]}"
    for k, (mark, code) in enumerate(b for b in found if b[0] is not None):
        kind, _, arg = mark.partition(" ")
        folder = tmp_path / f"block_{k}"
        if kind == "in":
            shutil.copytree(ROOT / arg, folder)
        else:
            folder.mkdir()
        (folder / "block.py").write_text(code)
        if kind == "torchrun" and arg.isdigit():
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={arg}", "block.py"]
        elif kind == "in":
            cmd = [sys.executable, "block.py"]
        elif kind == "mxnet" and not arg:
            mxnet = ROOT / ".mxref" / "bin" / "python"
            if not mxnet.exists():
                continue
            cmd = [str(mxnet), "block.py"]
        else:
            raise AssertionError(f"{path.name}: unknown doc-test marker {mark!r}")
        done = _run(cmd, folder)
        assert done.returncode == 0, f"{path.name}: its block marked {mark!r} fails:\n{done.stderr[-3000:]}"
