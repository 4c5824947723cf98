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


def tiny_recipe(tmp, root, out, name='recipe', **extra):
    "A recipe based on tiny.yaml reading `root`, versions under `out`; `extra` sections are merged in."
    import yaml
    d = {'base': str(ROOT / 'params' / 'tiny.yaml'), 'name': 't', 'source': {'root': str(root)},
         'prepare': {'out': str(out), 'workers': 1}}
    for k, v in extra.items(): d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    f = Path(tmp) / f'{name}.yaml'
    f.write_text(yaml.safe_dump(d))
    return f


# The one tiny detector every test file that only needs *a* trained run shares (train, evaluate, explain, serve,
# metrics): 3 epochs, 2 No-Finding images drawn per epoch (6 finding + 4 No-Finding in the tiny train split).
TRAIN = {'epochs': 3, 'negative_ratio': 0.34}
EXPLAIN = {'threshold': 0.001, 'per_class': 2, 'n_original': 1, 'max_lesions': 300}


@pytest.fixture(scope='session')
def tiny_run(tiny_set, tmp_path_factory):
    "The tiny set prepared, trained (3 epochs) and evaluated once per session through the CLI: (recipe, stdout)."
    tmp = tmp_path_factory.mktemp('tiny-run')
    f = tiny_recipe(tmp, tiny_set, tmp / 'versions', train=TRAIN, explain=EXPLAIN)
    mammo('prepare', f, '--quiet')
    return f, mammo('train', f)
