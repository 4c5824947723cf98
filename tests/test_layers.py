"""The package's layering: the import-linter contracts in `.importlinter` hold, and they fail on an upward import;
no module (tests included) imports another module's `_private` name."""
import ast, os, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / 'lint-imports'


def lint(pkg_parent: Path) -> subprocess.CompletedProcess:
    "lint-imports with the repository's contracts on the `mammo_nb` package found under `pkg_parent`."
    env = dict(os.environ, PYTHONPATH=str(pkg_parent))
    return subprocess.run([str(LINT), '--config', str(ROOT / '.importlinter'), '--no-cache'], cwd=pkg_parent, env=env,
                          capture_output=True, text=True, timeout=300)


def test_contracts_hold_and_bite(tmp_path):
    shutil.copytree(ROOT / 'mammo_nb', tmp_path / 'mammo_nb', ignore=shutil.ignore_patterns('__pycache__'))
    ok = lint(tmp_path)
    assert ok.returncode == 0 and '0 broken' in ok.stdout, ok.stdout[-2000:]
    # the data layer reaching up into the pipeline (what `prepare.ensure_source` used to do) breaks the layers
    f = tmp_path / 'mammo_nb' / 'prepare.py'
    f.write_text(f.read_text() + '\ndef _up():\n    from mammo_nb.pipeline import stage_synth\n')
    bad = lint(tmp_path)
    assert bad.returncode != 0 and 'mammo_nb.prepare -> mammo_nb.pipeline' in bad.stdout, bad.stdout[-2000:]
    # and metrics importing torch breaks the light-modules contract
    f.write_text(f.read_text().replace('from mammo_nb.pipeline import stage_synth', 'import os'))
    m = tmp_path / 'mammo_nb' / 'metrics.py'
    m.write_text(m.read_text() + '\ndef _t():\n    import torch\n')
    assert 'mammo_nb.metrics -> torch' in lint(tmp_path).stdout


def private_imports(files) -> list[str]:
    "`from mammo_nb.x import _name` lines: a module (or test) taking another module's private name."
    out = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom) and ((node.module or '').startswith('mammo_nb') or node.level > 0):
                mod = f'{"." * node.level}{node.module or ""}'
                out += [f'{f.relative_to(ROOT)}:{node.lineno} {mod}.{a.name}' for a in node.names
                        if a.name.startswith('_') and not a.name.startswith('__')]
    return out


def test_no_private_cross_module_imports():
    files = sorted((ROOT / 'mammo_nb').rglob('*.py')) + sorted((ROOT / 'tests').glob('*.py')) + sorted((ROOT / 'bench').glob('*.py'))
    files = [f for f in files if f.name != '_modidx.py']
    assert len(files) > 40
    assert private_imports(files) == []
    # the check itself finds one
    probe = ROOT / 'tests' / '.probe_private.py'
    try:
        probe.write_text('from mammo_nb.metrics import _weighted_curve\n')
        assert private_imports([probe]) == ['tests/.probe_private.py:1 mammo_nb.metrics._weighted_curve']
    finally: probe.unlink()
