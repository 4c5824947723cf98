"""`mammo cv` on the session's tiny version: folds of whole patients as derived versions, one tiny run per fold,
out-of-fold predictions pooled into one set of figures, the fold ensemble on test, reruns that retrain nothing."""
import json, subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch, torchvision

from conftest import BIN, ROOT, TRAIN, cli, run_here, tiny_recipe
from mammo_nb.cv import cv_root, fuse_boxes
from mammo_nb.metrics import BOX, Scored, bootstrap, box_iou, choose_threshold, fmt_ci, nest, score_predictions
from mammo_nb.params import load_params
from mammo_nb.files import clean_json, file_sha256
from mammo_nb.prepare import load_version, version_dir
from mammo_nb.split import group_keys
from mammo_nb.runs import run_name

CV = {'epochs': 1}


@pytest.fixture(scope='module')
def cv(tiny_run, tiny_set):
    "Two folds of the session's tiny version, one epoch each, through the CLI: (recipe, params, stdout, cv.json)."
    f0, _ = tiny_run
    p0 = load_params(f0)
    f = tiny_recipe(Path(f0).parent, tiny_set, p0.prepare.out, name='cv2', split={'folds': 2}, train={**TRAIN, **CV})
    p = load_params(f)
    assert version_dir(p) == version_dir(p0)                     # split.folds does not change the version
    r = run_here('cv', f)
    return f, p, r.stdout, json.loads((cv_root(p) / run_name(p, 'yolov8n.yaml') / 'cv.json').read_text())


def test_folds_are_whole_patients_in_derived_versions(cv):
    f, p, out, m = cv
    V = load_version(version_dir(p))
    t = pd.read_csv(cv_root(p) / 'folds.csv', dtype={'image_id': str})
    assert t.image_id.tolist() == V.images.image_id.tolist()
    test = V.images.split.eq('test').to_numpy()
    assert (t.fold[test] == -1).all() and set(t.fold[~test]) == {0, 1}         # every non-test image in a fold, test in none
    assert (t[~test].groupby('group').fold.nunique() == 1).all()                # no patient in two folds
    assert set(t.group[~test]) == set(group_keys(V.images)[~test])
    for k in range(2):
        Vk = load_version(cv_root(p) / f'fold{k}')
        mk = Vk.manifest
        assert mk['derived_from'] == dict(version=V.manifest['version'], manifest_sha256=file_sha256(V.dir / 'manifest.json'),
                                          dir=mk['derived_from']['dir'])
        assert (mk['cv']['folds'], mk['cv']['fold']) == (2, k) and mk['version'] == f"{V.manifest['version']}-k2f{k}"
        sp = Vk.images.set_index('image_id').split
        assert set(sp[sp == 'val'].index) == set(t.image_id[t.fold == k])
        assert set(sp[sp == 'train'].index) == set(t.image_id[(t.fold >= 0) & (t.fold != k)])
        assert set(sp[sp == 'test'].index) == set(V.images.image_id[test])
        assert (Vk.dir / 'images').is_symlink() and all((Vk.dir / x).is_file() for x in Vk.images.png)   # the parent's PNGs
        assert sum(mk['counts']['images_per_split'].values()) == len(V.images)
        # the fold's lists hold its detection images, and its label files are the parent's
        val = (Vk.dir / 'val.txt').read_text().split()
        det = Vk.images[(Vk.images.split == 'val') & Vk.images.role.isin(['positive', 'negative'])]
        assert sorted(val) == sorted(f'./{x}' for x in det.png)
        for r in det.itertuples():
            rel = f'labels/{r.study_id}/{r.image_id}.txt'
            assert (Vk.dir / rel).read_text() == (V.dir / rel).read_text()
    assert [r['images'] for r in m['fold_rows']] == [int((t.fold == k).sum()) for k in range(2)]


def test_oof_covers_each_image_once_and_pooled_figures_recompute(cv):
    f, p, out, m = cv
    V = load_version(version_dir(p))
    d = cv_root(p) / m['run']
    oof = pd.read_csv(d / 'oof-predictions.csv', dtype={'image_id': str})
    t = pd.read_csv(cv_root(p) / 'folds.csv', dtype={'image_id': str}).set_index('image_id')
    assert len(oof) and (oof.image_id.map(t.fold) == oof.fold).all()          # each image scored by the model that never saw it
    vals = [set(load_version(cv_root(p) / f'fold{k}').images.query("split == 'val'").image_id) for k in range(2)]
    nt = V.images[V.images.split != 'test']
    assert not (vals[0] & vals[1]) and vals[0] | vals[1] == set(nt.image_id)
    # the pooled figures are the figures of the concatenated OOF file, scored as one split
    e = p.evaluate
    S = Scored(nt, V.boxes[V.boxes.image_id.isin(nt.image_id)], oof, V.manifest['classes'], e.score_classes, e.hit_iou,
               tuple(e.froc_fps), e.pooled_nms_iou, e.max_det)
    thr = choose_threshold(S.img_label, S.img_score, e.target_sensitivity)
    assert m['operating_point']['threshold'] == clean_json(thr) and m['operating_point']['chosen_on'] == 'pooled out-of-fold predictions'
    S.threshold = thr
    assert clean_json(nest(bootstrap(S.metrics, S.group, e.bootstrap, e.seed, e.ci), S)) == m['splits']['oof']
    # ...as anyone recomputes them from the file: the version's non-test splits scored as one
    x = score_predictions(d / 'oof-predictions.csv', version_dir(p), split=['train', 'val'], n_boot=e.bootstrap, threshold=thr)
    assert x['splits']['train+val'] == m['splits']['oof']
    assert m['splits']['oof']['n_images'] == len(nt) and m['bootstrap']['unit'] == 'patient' and 'pooled' in m['conventions']['oof']
    # the per-fold rows are each fold run's own val figures
    for r in m['fold_rows']:
        fm = json.loads((Path(r['run']) / 'eval' / 'metrics.json').read_text())
        assert r['val'] == fm['splits']['val'] and r['test'] == fm['splits']['test']
    assert 'folds: mean ± sd' in out and 'pooled OOF' in out and 'ensemble' in out


def test_ensemble_scored_like_one_model_and_identical_models_fuse_to_themselves(cv):
    f, p, out, m = cv
    V = load_version(version_dir(p))
    te = V.images[V.images.split == 'test']
    P = pd.read_csv(Path(m['fold_rows'][0]['run']) / 'eval' / 'predictions-test.csv', dtype={'image_id': str})
    assert len(P)
    iou = p.evaluate.iou
    same = fuse_boxes([P, P, P], te, V.manifest['classes'], iou=iou, max_det=p.evaluate.max_det)
    # the model's boxes, less those its NMS would have removed had it run after the boxes were clipped to the image:
    # each one overlaps a kept box of its class by more than the IoU (WBF would merge it into that box)
    kept = []
    for _, g in P.groupby(['image_id', 'cls']):
        k = torchvision.ops.nms(torch.tensor(g[BOX].to_numpy(float)), torch.tensor(g.score.to_numpy(float)), iou).numpy()
        kept.append(g.iloc[k])
        gone = g.drop(g.index[k])
        assert (box_iou(gone[BOX].to_numpy(), g.iloc[k][BOX].to_numpy()) > iou).any(1).all()
    key = lambda d: d.sort_values(['image_id', 'cls', 'score', 'x0'], ignore_index=True)
    a, b = key(pd.concat(kept)), key(same)
    assert len(a) == len(b) and (a.image_id == b.image_id).all() and (a.cls == b.cls).all()
    np.testing.assert_allclose(b.score, a.score, atol=2e-5)
    np.testing.assert_allclose(b[BOX].to_numpy(), a[BOX].to_numpy(), atol=0.02)
    ens = pd.read_csv(cv_root(p) / m['run'] / 'ensemble-test-predictions.csv', dtype={'image_id': str})
    e = p.evaluate
    S = Scored(te, V.boxes[V.boxes.image_id.isin(te.image_id)], ens, V.manifest['classes'], e.score_classes, e.hit_iou,
               tuple(e.froc_fps), e.pooled_nms_iou, e.max_det)
    S.threshold = m['operating_point']['threshold']
    assert clean_json(nest(bootstrap(S.metrics, S.group, e.bootstrap, e.seed, e.ci), S)) == m['splits']['test: ensemble']
    assert set(m['splits']) == {'oof', 'test: ensemble', 'test: fold 0', 'test: fold 1'}
    assert m['ensemble']['method'].startswith('Weighted Boxes Fusion') and m['ensemble']['iou'] == e.iou


def test_rerun_retrains_nothing_and_rewrites_identical_folds(cv):
    f, p, out, m = cv
    runs = [Path(r['run']) for r in m['fold_rows']]
    before = [(rd / 'train.json').stat().st_mtime_ns for rd in runs]
    mans = [(cv_root(p) / f'fold{k}' / 'manifest.json').read_bytes() for k in range(2)]
    r = cli('cv', f)
    assert r.returncode == 0, r.stderr
    assert [(rd / 'train.json').stat().st_mtime_ns for rd in runs] == before
    assert [(cv_root(p) / f'fold{k}' / 'manifest.json').read_bytes() for k in range(2)] == mans
    assert json.loads((cv_root(p) / m['run'] / 'cv.json').read_text()) == m
    r = cli('cv', f, '--fold', '1')                              # an array task whose fold is done: found finished
    assert r.returncode == 0 and 'fold 1 of 2' in r.stdout
    assert [(rd / 'train.json').stat().st_mtime_ns for rd in runs] == before


def test_clear_errors(cv, tiny_run, tiny_set, tmp_path):
    f, p, out, m = cv
    r = cli('cv', f, '--fold', '2')
    assert r.returncode == 2 and 'folds 0..1' in r.stderr
    g = tiny_recipe(tmp_path, tiny_set, p.prepare.out, name='nocv', train={**TRAIN, **CV})
    r = cli('cv', g)
    assert r.returncode == 2 and "'split.folds' >= 2" in r.stderr and '--folds' in r.stderr
    r = cli('cv', g, '--folds', '3', '--merge')                  # pooling before the folds ran
    assert r.returncode == 2 and 'fold(s) [0, 1, 2] of 3 not trained' in r.stderr and 'Traceback' not in r.stderr
    r = cli('cv', g, '--folds', '40')
    assert r.returncode == 2 and "'split.folds' must be <= 20" in r.stderr


def test_report_notebook(cv, tmp_path):
    f, p, out, m = cv
    nb = tmp_path / 'cv.ipynb'
    r = subprocess.run([str(BIN / 'papermill'), str(ROOT / 'nbs/pipeline/25_cv.ipynb'), str(nb), '-p', 'params_path', str(f),
                        '-p', 'root', str(ROOT), '--cwd', str(ROOT / 'nbs/pipeline')], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = json.dumps(json.loads(nb.read_text()))
    assert 'image/png' in text and 'pooled OOF' in text and 'ensemble' in text and 'fold 1' in text
    from mammo_nb.pipeline import headlines
    h = headlines(p)[m['run']]                                  # the version index lists the pooled and ensemble figures
    assert h['cv k2 oof AP50 Mass'] == fmt_ci(m['splits']['oof']['per_class']['Mass']['ap50'])
    assert 'cv k2 test: ensemble all-lesion sens@1FP' in h


def test_arms_share_the_folds_and_a_fold_pretrains_on_its_training_folds_only(cv, tiny_set):
    "`cv.arms`: the recipe from scratch beside train.ssl (one epoch each), one table; the same folds for both."
    f, p, out, m = cv
    g = tiny_recipe(Path(f).parent, tiny_set, p.prepare.out, name='arms', split={'folds': 2}, train={**TRAIN, **CV},
                    ssl={'epochs': 1, 'crops': 2, 'batch': 8, 'crop': 128},
                    cv={'arms': {'scratch': {}, 'ssl': {'train': {'ssl': True}}}, 'select': 'Mass'})
    r = run_here('cv', g)
    q = load_params(g)
    arms = json.loads((cv_root(q) / 'arms.json').read_text())
    assert set(arms['ranked']) == {'scratch', 'ssl'} and arms['best'] == arms['ranked'][0] and 'best:' in r.stdout
    assert arms['folds_sha256'] == file_sha256(cv_root(q) / 'folds.csv')
    assert arms['arms']['scratch']['run'] == m['run']                     # the recipe's own settings: its runs, not retrained
    res = {a: json.loads(Path(arms['arms'][a]['cv_json']).read_text()) for a in arms['ranked']}
    s, t = res['scratch'], res['ssl']
    assert [r['version'] for r in s['fold_rows']] == [r['version'] for r in t['fold_rows']]           # the same fold versions
    assert s['splits']['oof']['n_images'] == t['splits']['oof']['n_images'] and s['manifest_sha256'] == t['manifest_sha256']
    for row in t['fold_rows']:
        Vk = load_version(cv_root(q) / f"fold{row['fold']}")
        man = json.loads(Path(row['ssl']['file']).read_text())
        seen = {x['sha256'] for x in man['images']['version']}
        assert seen == {file_sha256(Vk.dir / x) for x in Vk.images.png[Vk.images.split == 'train']}   # its training folds
        assert not seen & {file_sha256(Vk.dir / x) for x in Vk.images.png[Vk.images.split != 'train']}
        assert row['ssl']['transductive'] is False and man['splits'] == ['train']
    assert 'ssl s (all folds)' in pd.DataFrame(arms['table']).index
