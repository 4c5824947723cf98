"The GPU machine's prepared script runs anywhere: on the CPU with a tiny recipe, it decodes, trains and reports."
import json, subprocess, sys
from pathlib import Path
from conftest import ROOT


def test_gpu_script_on_cpu(tiny_run, tmp_path):
    f, _ = tiny_run                                  # the session's tiny version: the bench trains one epoch beside its run
    r = subprocess.run(['bash', str(ROOT / 'bench' / 'gpu.sh'), '--tiny', str(f), '--out', str(tmp_path / 'out'), '--files', '4'],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**__import__('os').environ, 'PYTHON': sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr
    g = json.loads((tmp_path / 'out' / 'gpu.json').read_text())
    d, t = g['decode'], g['train']
    assert d['files'] == 4 and d['gpu_decode'] == 'no CUDA device'                   # no GPU here: said, not skipped silently
    assert set(d['images_per_s']) == {'cpu full (imagecodecs, 1 thread)', 'cpu reduced for long side 1024 (level 0)'}
    assert all(v > 0 for v in d['images_per_s'].values())
    assert t['device'] == 'cpu' and t['epochs'] == 1 and len(t['s_per_epoch']) == 1 and t['s_per_epoch'][0] > 0
    assert t['gpu_util_pct_mean'] is None and t['samples'] == 0
    assert not list(Path(f).parent.glob('versions/*/runs/bench-gpu-*'))                 # the bench run is removed
    assert 'JPEG 2000 decode, 4 files' in r.stdout and 's/epoch' in r.stdout
