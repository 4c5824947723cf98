"""`mammo selftrain` on the tiny preset: teacher + 2 pseudo-label rounds with real ultralytics training; the
manifest chain, the pool rules (val/test never pseudo-labelled, hidden labels really hidden), a rerun that reuses
every round and rewrites identical manifests, and the report notebook through `mammo run --stages selftrain`."""
import hashlib, json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, mammo, run_here
from mammo_nb.params import load_params
from mammo_nb.prepare import load_version, version_dir
from mammo_nb.selftrain import hide_labels, unlabeled_pool

SELF = {'rounds': 2, 'unlabeled_fraction': 0.5, 'conf': 0.001, 'max_per_image': 3}


def sha(f): return hashlib.sha256(Path(f).read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def run(tiny_set, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('selftrain')
    d = {'base': str(ROOT / 'params' / 'tiny.yaml'), 'name': 'st', 'source': {'root': str(tiny_set)},
         'prepare': {'out': str(tmp / 'versions'), 'workers': 1}, 'selftrain': SELF, 'evaluate': {'bootstrap': 20},
         'train': {'epochs': 1}}                # teacher, 2 students and the control: 1 epoch each
    f = tmp / 'st.yaml'
    f.write_text(yaml.safe_dump(d))
    mammo('prepare', f, '--quiet')
    r = run_here('selftrain', f)
    p = load_params(f)
    st = next((version_dir(p) / 'selftrain').iterdir())
    return f, p, r, st, json.loads((st / 'selftrain.json').read_text())


def test_rounds_and_manifest_chain(run):
    f, p, r, st, S = run
    assert 'best round' in r.stdout and '(teacher)' in r.stdout
    assert [x['round'] for x in S['rounds']] == [0, 1, 2]
    base = load_version(version_dir(p))
    prev_dir, prev_version = base.dir, base.manifest['version']
    for k in range(3):
        d = st / f'round-{k}'
        m = json.loads((d / 'manifest.json').read_text())
        assert m['round'] == k and m['base_version'] == base.manifest['version']
        assert m['derived_from']['version'] == prev_version
        assert m['derived_from']['manifest_sha256'] == sha(prev_dir / 'manifest.json')
        assert m['selftrain']['thresholds']['Mass'] == SELF['conf']
        for rel, h in m['files'].items(): assert sha(d / rel) == h, rel                       # the manifest is true
        run_dir = d / 'runs' / ('teacher' if k == 0 else 'student')
        assert (run_dir / 'weights' / 'best.pt').is_file() and (run_dir / 'eval' / 'metrics.json').is_file()
        tj = json.loads((run_dir / 'train.json').read_text())
        assert tj['version'] == m['version']
        if k: assert m['selftrain']['teacher']['weights_sha256'] == sha(st / f'round-{k - 1}' / 'runs' /
                                                                        ('teacher' if k == 1 else 'student') / 'weights' / 'best.pt')
        prev_dir, prev_version = d, m['version']
    assert S['rounds'][1]['pseudo_boxes'] > 0, 'the test threshold is low enough for the 1-epoch teacher to pseudo-label'
    c = st / 'round-0' / 'runs' / 'control'                    # the no-pseudo-label control: teacher trained on, labeled only
    assert S['control']['round'] == 'control' and (c / 'weights' / 'best.pt').is_file()
    assert json.loads((c / 'train.json').read_text())['args']['epochs'] == p.train.epochs and 'control' in r.stdout


def test_pool_rules(run):
    """Hidden labels stay hidden, pseudo boxes land only on pool images, val/test lists and labels are the base's."""
    f, p, r, st, S = run
    base = load_version(version_dir(p))
    hidden = hide_labels(base, SELF['unlabeled_fraction'], 0)
    pool = set(unlabeled_pool(base, hidden).image_id)
    assert hidden and hidden <= set(base.images.image_id[base.images.split == 'train'])
    for k in range(3):
        R = load_version(st / f'round-{k}')
        ps = R.boxes[R.boxes.layer == 'pseudo']
        assert set(ps.image_id) <= pool
        assert not (set(ps.image_id) & set(base.images.image_id[base.images.split != 'train']))
        m = R.manifest
        assert m['pseudo']['boxes_per_class'] == ps.cls.value_counts().sort_index().to_dict()
        for sp in ('val', 'test'):
            assert (R.dir / f'{sp}.txt').read_text() == (base.dir / f'{sp}.txt').read_text()
            for x in (R.dir / f'{sp}.txt').read_text().split():
                lab = x.removeprefix('./').replace('images/', 'labels/', 1).replace('.png', '.txt')
                assert (R.dir / lab).read_text() == (base.dir / lab).read_text()
        train = {Path(x).stem for x in (R.dir / 'train.txt').read_text().split()}
        assert not (train & (hidden - set(ps.image_id)))                   # hidden, unlabelled: out of training
        for iid in train - set(ps.image_id):                               # labeled images keep the base labels
            row = base.images.set_index('image_id').loc[iid]
            lab = f'labels/{row.study_id}/{iid}.txt'
            assert (R.dir / lab).read_text() == (base.dir / lab).read_text()
        for iid, g in ps.groupby('image_id'):                              # pseudo images carry exactly their boxes
            row = base.images.set_index('image_id').loc[iid]
            assert len((R.dir / f'labels/{row.study_id}/{iid}.txt').read_text().splitlines()) == len(g)
        if k: assert {q['cls'] for q in m['selftrain']['quality']} >= {'all'}


def test_rerun_reuses_rounds_and_reports(run, tmp_path):
    """A rerun (here through the report notebook) retrains nothing and rewrites byte-identical manifests."""
    f, p, r, st, S = run
    before = {k: sha(st / f'round-{k}' / 'manifest.json') for k in range(3)}
    weights = {k: sha(st / f'round-{k}' / 'runs' / ('teacher' if k == 0 else 'student') / 'weights' / 'best.pt') for k in range(3)}
    out = mammo('run', f, '--stages', 'selftrain', '--out', tmp_path / 'reports')
    assert 'selftrain: ok' in out.stdout, out.stdout + out.stderr
    assert before == {k: sha(st / f'round-{k}' / 'manifest.json') for k in range(3)}
    assert weights == {k: sha(st / f'round-{k}' / 'runs' / ('teacher' if k == 0 else 'student') / 'weights' / 'best.pt') for k in range(3)}
    html = next((tmp_path / 'reports').rglob('30_selftrain.html')).read_text()
    assert 'best round' in html and 'pseudo precision' in html
