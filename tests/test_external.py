"""External validation as a user runs it: the session's tiny detector (trained on the synthetic VinDr layout)
scored with `mammo evaluate --on` on synthetic INbreast- and CBIS-DDSM-layout versions: classes aligned by name,
the ones a version lacks named as not scorable, and a version that shares images and patients refused, then
allowed and counted."""
import json
from pathlib import Path

import pytest

from conftest import cli, layout_version, run_here, tiny_recipe
from mammo_nb.params import load_params
from mammo_nb.prepare import version_dir
from mammo_nb.runs import run_dir

@pytest.fixture(scope='module')
def targets(tmp_path_factory):
    "The session's synthetic INbreast and CBIS-DDSM versions (test_adapters builds and checks the same ones)."
    return {layout: layout_version(tmp_path_factory, layout)[1] for layout in ('inbreast', 'cbis')}


def _external(run, target) -> dict:
    return json.loads((run / 'eval' / 'external' / version_dir(load_params(target)).name / 'metrics.json').read_text())


def test_scored_on_inbreast_and_cbis(tiny_run, targets):
    f, _ = tiny_run
    p = load_params(f)
    run = run_dir(p, 'yolov8n.yaml')
    internal = json.loads((run / 'eval' / 'metrics.json').read_text())
    for layout, g in targets.items():
        r = run_here('evaluate', f, '--run', str(run), '--on', g, '--split', 'all')
        m = _external(run, g)
        classes = load_params(g).prepare.classes
        al = m['class_alignment']
        assert set(al['scored']) == set(classes) & set(p.prepare.classes) and all(k == v for k, v in al['scored'].items())
        assert set(al['not_scorable']) == set(p.prepare.classes) - set(classes)
        if layout == 'inbreast':                     # its recipe has 5 of the run's 11 classes (the CBIS one all of them)
            assert al['not_scorable'] and f"not scorable (absent from {m['scored_on']})" in r.stdout
        assert 'internal: ' in r.stdout and 'external: ' in r.stdout
        s = m['splits']['all']
        assert set(s['per_class']) == set(al['scored'].values())          # no zero rows for classes the target lacks
        man = json.loads((version_dir(load_params(g)) / 'manifest.json').read_text())
        assert s['per_class']['Mass']['n_gt'] > 0 and s['n_images'] == man['counts']['images']       # --split all
        assert m['operating_point']['threshold'] == internal['operating_point']['threshold']
        assert m['overlap']['images'] == 0 and m['overlap']['patients'] == 0 and m['overlap']['files_compared']
        assert m['conventions']['bootstrap']['unit'] and m['trained_on'] == internal['version']
        assert (run / 'eval' / 'external' / m['scored_on'] / 'froc_roc.png').is_file()


def test_overlap_refused_then_allowed_and_counted(tiny_run, tiny_set, tmp_path):
    "The run's own source prepared again at another size: same files, same patients (same key): not external."
    f, _ = tiny_run
    p = load_params(f)
    run = run_dir(p, 'yolov8n.yaml')
    g = tiny_recipe(Path(f).parent, tiny_set, p.prepare.out, name='resized', clahe={'long_side': 192})
    run_here('prepare', g, '--quiet')
    r = cli('evaluate', f, '--run', str(run), '--on', g, '--class-map', 'Mass')
    assert r.returncode == 2 and '--class-map takes RUN=OTHER' in r.stderr and 'Traceback' not in r.stderr
    r = cli('evaluate', f, '--run', str(run), '--on', g)
    assert r.returncode == 2 and 'share' in r.stderr and '--allow-overlap' in r.stderr and 'Traceback' not in r.stderr
    run_here('evaluate', f, '--run', str(run), '--on', g, '--allow-overlap')
    m = _external(run, g)
    n = json.loads((version_dir(load_params(g)) / 'manifest.json').read_text())['counts']['images']
    assert m['overlap'] == dict(images=n, patients=m['overlap']['patients'], same_pseudonym_key=True, files_compared=True, allowed=True)
    assert m['overlap']['patients'] > 0 and m['class_alignment']['not_scorable'] == []
