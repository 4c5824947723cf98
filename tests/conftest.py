import os, shutil, subprocess, sys, tempfile
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
os.environ.setdefault('YOLO_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')

# Under pytest-xdist each worker (and every process it starts) gets its own share of the cores: the stages default
# to "every core this process may use", so two workers on two cores train with one thread each instead of four
# threads fighting over two cores (measured: 12 min pinned-free vs the serial 16 min, with every test slower).
_w, _n = os.environ.get('PYTEST_XDIST_WORKER'), int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
if _w and _n > 1 and hasattr(os, 'sched_setaffinity'):
    _cores = sorted(os.sched_getaffinity(0))
    if len(_cores) >= _n: os.sched_setaffinity(0, _cores[int(_w.removeprefix('gw')) % _n::_n])


def mammo(*args, cwd=None, check=True, timeout=600):
    "Run the installed `mammo` command; return the CompletedProcess."
    r = subprocess.run([str(BIN / 'mammo'), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f'mammo {" ".join(map(str, args))} -> {r.returncode}\n{r.stdout}\n{r.stderr}')
    return r


def cli(*args) -> subprocess.CompletedProcess:
    """`mammo ARGS` run in this process: for commands that stop at a clear error before doing any work, which would
    otherwise spend most of their time starting Python and importing torch (~6 s each). The same `main` as the
    `mammo` script: a traceback would propagate and fail the test."""
    import contextlib, io
    from mammo_nb.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: rc = main([str(a) for a in args])
        except SystemExit as e: rc = e.code              # argparse errors exit 2 after printing usage
    return subprocess.CompletedProcess(['mammo', *map(str, args)], rc, out.getvalue(), err.getvalue())


def run_here(*args) -> subprocess.CompletedProcess:
    """`mammo ARGS` run to completion in this process (`cli`), for a test about what the command does rather than how it
    starts: no second start-up and torch import (~5 s). Fails the test on a non-zero exit; restores torch's threads
    (the stages set them)."""
    import torch
    n = torch.get_num_threads()
    try: r = cli(*args)
    finally: torch.set_num_threads(n)
    assert r.returncode == 0, f'mammo {" ".join(map(str, args))} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    return r


def shared(tmp_path_factory, name, build) -> Path:
    """Folder `name`, filled by `build(folder)` once per test session, also under pytest-xdist: the first worker to
    get here builds it, the others wait on its lock and reuse it."""
    from filelock import FileLock
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'): root = root.parent          # shared by the workers of this run
    d = root / name
    with FileLock(str(d) + '.lock'):
        if not (d / '.built').exists():
            shutil.rmtree(d, ignore_errors=True); d.mkdir(parents=True)
            build(d)
            (d / '.built').touch()
    return d


@pytest.fixture(scope='session')
def tiny_set(tmp_path_factory):
    "The tiny preset, written once per session through the CLI."
    return shared(tmp_path_factory, 'synth', lambda d: mammo('synth', '--preset', 'tiny', '--out', d / 'tiny', '--seed', '0',
                                                              '--quiet')) / 'tiny'


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
    """The tiny set prepared, trained (3 epochs) and evaluated once per session through the CLI:
    (recipe, what `mammo train` printed)."""
    def build(d):
        f = tiny_recipe(d, tiny_set, d / 'versions', train=TRAIN, explain=EXPLAIN)
        mammo('prepare', f, '--quiet')
        (d / 'train.out').write_text(mammo('train', f).stdout)
    d = shared(tmp_path_factory, 'tiny-run', build)
    return d / 'recipe.yaml', (d / 'train.out').read_text()


# The longest files first, so that no pytest-xdist worker starts a long one while the other has nothing left to do
# (Makefile: --no-loadscope-reorder, else xdist orders files by their number of tests). Seconds per file, measured on
# one pinned core of this 2-core machine (pytest --durations=0, 2026-12-02); files not listed run last.
SECONDS = {'test_pipeline': 172, 'test_train': 106, 'test_slurm': 96, 'test_adapters': 75, 'test_classify': 100,
           'test_selftrain': 69, 'test_cv': 180, 'test_prepare': 56, 'test_external': 50, 'test_archive': 23,
           'test_explain': 23, 'test_synth_cli': 23, 'test_serve': 18, 'test_bench': 12, 'test_tvdet': 70, 'test_pretrain': 70,
           'test_layers': 25, 'test_tiles': 55, 'test_selfsup': 75}

def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda it: -SECONDS.get(it.path.stem, 0))          # stable: a file's tests keep their order


# The layouts' recipes: tiny.yaml in another layout; INbreast with params/inbreast.yaml's classes (isolated
# calcifications image-level), so that a VinDr-trained run has classes it cannot be scored on there.
LAYOUT_PREPARE = {'inbreast': {'classes': ['Mass', 'Suspicious Calcification', 'Architectural Distortion', 'Asymmetry', 'Spiculation'],
                               'priority': ['Mass', 'Suspicious Calcification', 'Architectural Distortion', 'Asymmetry', 'Spiculation'],
                               'ignore': ['Calcification']}}


def layout_recipe(tmp: Path, layout: str, root: Path | None = None, name: str = 'r') -> Path:
    "A tiny recipe in `layout`: the synthetic set in `tmp/raw` (or `root`), versions in `tmp/versions`."
    import yaml
    d = {'base': str(ROOT / 'params' / 'tiny.yaml'), 'name': layout, 'source': {'layout': layout, **({'root': str(root)} if root else {})},
         'synth': {'out': str(tmp / 'raw')}, 'prepare': {'out': str(tmp / 'versions'), 'workers': 2, **LAYOUT_PREPARE.get(layout, {})}}
    f = Path(tmp) / f'{name}.yaml'
    f.write_text(yaml.safe_dump(d))
    return f


def layout_version(tmp_path_factory, layout: str):
    """The synthetic set in `layout`, `mammo prepare --dry-run`'s and `mammo prepare`'s output, and its version, built
    once per session through the CLI: (folder, recipe, dry-run stdout, prepare stdout)."""
    def build(d):
        f = layout_recipe(d, layout)
        mammo('synth', '--params', f)
        (d / 'dry.out').write_text(mammo('prepare', f, '--dry-run').stdout)
        (d / 'prepare.out').write_text(mammo('prepare', f, '--quiet').stdout)
    d = shared(tmp_path_factory, f'layout-{layout}', build)
    return d, d / 'r.yaml', (d / 'dry.out').read_text(), (d / 'prepare.out').read_text()


def chromium():
    """Paths of chromium and chromedriver, installed with apt when missing (None when that is impossible). One
    installer at a time: the two pytest-xdist workers' browser tests would otherwise race for dpkg's lock."""
    import fcntl
    with open(Path(tempfile.gettempdir()) / 'mammo-nb-apt.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _chromium()


def _chromium():
    if not (shutil.which('chromium') and shutil.which('chromedriver')) and os.geteuid() == 0 and shutil.which('apt-get'):
        env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
        subprocess.run(['apt-get', 'install', '-y', '-q', 'chromium', 'chromium-driver'], env=env, capture_output=True, timeout=900)
        if not shutil.which('chromium'):
            subprocess.run(['apt-get', 'update', '-q'], env=env, capture_output=True, timeout=600)
            subprocess.run(['apt-get', 'install', '-y', '-q', 'chromium', 'chromium-driver'], env=env, capture_output=True, timeout=900)
    return (shutil.which('chromium'), shutil.which('chromedriver')) if shutil.which('chromium') and shutil.which('chromedriver') else None
