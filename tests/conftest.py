import os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
os.environ.setdefault('YOLO_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')


def mammo(*args, cwd=None, check=True, timeout=600):
    "Run the installed `mammo` command; return the CompletedProcess."
    r = subprocess.run([str(BIN / 'mammo'), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f'mammo {" ".join(map(str, args))} -> {r.returncode}\n{r.stdout}\n{r.stderr}')
    return r


@pytest.fixture(scope='session')
def tiny_set(tmp_path_factory):
    "The tiny preset, written once per session through the CLI."
    out = tmp_path_factory.mktemp('synth') / 'tiny'
    mammo('synth', '--preset', 'tiny', '--out', out, '--seed', '0', '--quiet')
    return out
