"""`mammo classify` on the tiny preset: patch sampling (abnormal patches show their lesion, normal ones show none),
the balanced warm-up and the unfreezing schedule as actually applied, and whole-image metrics next to the detector."""
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, TRAIN, layout_version, mammo, run_here
from mammo_nb.params import load_params
from mammo_nb.prepare import load_version, version_dir

CLS = {'task': 'patch', 'patch_size': 48, 'patch_stride': 24, 'imgsz': 32, 'epochs': 6, 'batch': 8, 'warmup_balanced': 2,
       'freeze_epochs': 2, 'unfreeze_steps': 2, 'unfreeze_every': 2, 'normal_ratio': 1.0, 'normal_margin': 4}


def recipe(tmp, raw, name, out, **cls):
    "A classify recipe on the session's tiny version (in `out`) and its detector (the TRAIN settings of tiny_run)."
    d = {'base': str(ROOT / 'params' / 'tiny.yaml'), 'name': 't', 'source': {'root': str(raw)},
         'prepare': {'out': str(out), 'workers': 1}, 'train': TRAIN, 'classify': {**CLS, **cls}}
    f = tmp / f'{name}.yaml'
    f.write_text(yaml.safe_dump(d))
    return f


@pytest.fixture(scope='module')
def patches(tiny_run, tiny_set, tmp_path_factory):
    "Patch classification on the session's tiny version, which tiny_run prepared and trained a detector on."
    tmp = tmp_path_factory.mktemp('classify')
    f = recipe(tmp, tiny_set, 'patch', Path(load_params(tiny_run[0]).prepare.out))
    assert version_dir(load_params(f)) == version_dir(load_params(tiny_run[0]))      # the same data params
    r = run_here('classify', f)
    p = load_params(f)
    m = json.loads(next((version_dir(p) / 'classify').glob('patch-*/runs/*/metrics.json')).read_text())
    return tmp, tiny_set, f, p, r, m


def test_patches_show_their_lesion_and_normals_none(patches):
    tmp, raw, f, p, r, m = patches
    V = load_version(version_dir(p))
    d = Path(m['dataset'])
    items = pd.read_csv(d / 'items.csv', dtype={'image_id': str})
    S = CLS['patch_size']
    ab, nm = items[items.label != 'normal'], items[items.label == 'normal']
    assert len(ab) and len(nm) and set(items.split) >= {'train', 'val', 'test'}
    boxes = V.boxes[V.boxes.layer != 'spiculation']
    for it in ab.itertuples():
        b = boxes[(boxes.image_id == it.image_id) & (boxes.row == it.lesion)]
        assert len(b), it
        b = b.iloc[0]
        if max(b.x1 - b.x0, b.y1 - b.y0) <= S:                     # a small lesion: its centre is in the patch
            cx, cy = (b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2
            assert it.x <= cx <= it.x + S and it.y <= cy <= it.y + S, (it, b)
        else:                                                      # a large one: the patch lies on it
            assert it.x < b.x1 and it.x + S > b.x0 and it.y < b.y1 and it.y + S > b.y0
    im = V.images.set_index('image_id')
    for it in nm.itertuples():
        b = V.boxes[V.boxes.image_id == it.image_id]
        assert not ((b.x0 < it.x + S) & (b.x1 > it.x) & (b.y0 < it.y + S) & (b.y1 > it.y)).any(), it
        png = cv2.imread(str(V.dir / im.png[it.image_id]), cv2.IMREAD_UNCHANGED)
        assert (png[int(it.y):int(it.y) + S, int(it.x):int(it.x) + S] > 0).mean() >= 0.75
        assert im.split[it.image_id] == it.split                   # a patch keeps its image's split
    assert abs(len(nm) - len(ab)) <= 0.25 * len(ab) + 3            # normal_ratio 1


def test_warmup_and_unfreezing_applied(patches):
    tmp, raw, f, p, r, m = patches
    sch = pd.DataFrame(m['schedule']).drop_duplicates('epoch', keep='last').set_index('epoch')
    assert list(sch.index) == list(range(CLS['epochs']))
    assert sch.balanced.tolist() == [True, True, False, False, False, False]
    items = pd.read_csv(Path(m['dataset']) / 'items.csv')
    tr = items[items.split == 'train'].label.value_counts()
    assert (sch['items'][sch.balanced] == len(tr) * tr.min()).all() and (sch['items'][~sch.balanced] == tr.sum()).all()
    t = sch.trainable_params.tolist()
    assert t[0] == t[1] < t[2] == t[3] < t[4] == t[5] <= sch.total_params.iloc[0]     # head, + top blocks, + the rest
    assert sch.unfrozen_layers.iloc[0] == [] and sch.unfrozen_layers.iloc[4] == list(range(len(sch.unfrozen_layers.iloc[4])))
    assert sch.class_weight.iloc[0] is not None                    # pos_weight: inverse-frequency weights in the loss
    for sp in ('val', 'test'):
        x = m['splits'][sp]['items']
        assert x['n'] == int((items.split == sp).sum()) and 0 <= x['prevalence']['value'] <= 1
    assert 'roc_auc' in r.stdout and 'prevalence' in r.stdout


def test_whole_images_next_to_the_detector(patches):
    """Whole-image task: breast-level figures, and the detector's max-box score on the same images."""
    tmp, raw, f, p, r, m = patches
    # the detector on the same version: the session's tiny run (tiny_run trained it with these train settings)
    g = recipe(tmp, raw, 'image', Path(p.prepare.out), task='image', epochs=2, warmup_balanced=1, freeze_epochs=1, unfreeze_steps=1, unfreeze_every=1)
    out = run_here('classify', g)
    q = load_params(g)
    mi = json.loads(next((version_dir(q) / 'classify').glob('image-*/runs/*/metrics.json')).read_text())
    V = load_version(version_dir(q))
    for sp in ('val', 'test'):
        s = mi['splits'][sp]
        n = int((V.images.split == sp).sum())
        assert s['items']['n'] == n and s['detector']['n'] == n       # the same images on both sides
        assert s['breast']['n'] == V.images[V.images.split == sp].groupby(['study_id', 'laterality']).ngroups
    assert 'detector max-box score' in out.stdout


def test_five_class_patches_on_cbis(tmp_path):
    """CBIS-DDSM's 5-class framing: normal + benign/malignant mass/calcification patches from the ROI-mask boxes."""
    d = {'base': str(ROOT / 'params' / 'cbis.yaml'), 'name': 'cb', 'source': {'layout': 'cbis', 'root': None},
         'synth': {'preset': 'tiny', 'out': str(tmp_path / 'raw'), 'workers': 1},
         'prepare': {'out': str(tmp_path / 'versions'), 'workers': 1}, 'clahe': {'long_side': 256},
         'train': {'device': 'cpu', 'workers': 0, 'cache': False, 'amp': False},
         'classify': {**CLS, 'labels': 'pathology', 'epochs': 2, 'warmup_balanced': 1, 'freeze_epochs': 1, 'unfreeze_steps': 1,
                      'unfreeze_every': 1, 'normal_ratio': 0.5}, 'evaluate': {'bootstrap': 10}}
    f = tmp_path / 'cb.yaml'
    f.write_text(yaml.safe_dump(d))
    mammo('synth', '--params', f)
    mammo('prepare', f, '--quiet')
    run_here('classify', f)
    p = load_params(f)
    V = load_version(version_dir(p))
    m = json.loads(next((version_dir(p) / 'classify').glob('patch-pathology-*/runs/*/metrics.json')).read_text())
    items = pd.read_csv(Path(m['dataset']) / 'items.csv', dtype={'image_id': str})
    assert set(items.label) <= {'normal', 'benign_mass', 'malignant_mass', 'benign_calc', 'malignant_calc'}
    assert 'normal' in set(items.label) and len(set(items.label)) >= 3
    b = V.boxes.set_index(['image_id', 'row'])
    for it in items[items.label != 'normal'].itertuples():                  # each patch's class is its lesion's
        r = b.loc[(it.image_id, it.lesion)]
        r = r.iloc[0] if isinstance(r, pd.DataFrame) else r
        assert it.label == f"{'benign' if r.pathology.startswith('benign') else r.pathology}_{'mass' if r.cls == 'Mass' else 'calc'}"
    assert all(c.startswith('malignant') for c in m['positive'])
    # the 4-class framing on the same version: BENIGN_WITHOUT_CALLBACK its own class, each patch its lesion's pathology
    assert set(V.boxes.pathology) >= {'benign', 'benign_without_callback', 'malignant'}
    g = tmp_path / 'cb4.yaml'
    g.write_text(yaml.safe_dump({**d, 'classify': {**d['classify'], 'labels': 'pathology4', 'epochs': 1, 'warmup_balanced': 0,
                                                    'freeze_epochs': 0}}))
    run_here('classify', g)
    m4 = json.loads(next((version_dir(p) / 'classify').glob('patch-pathology4-*/runs/*/metrics.json')).read_text())
    items = pd.read_csv(Path(m4['dataset']) / 'items.csv', dtype={'image_id': str})
    assert set(items.label) == {'normal', 'benign', 'benign_without_callback', 'malignant'} == set(m4['classes'])
    for it in items[items.label != 'normal'].itertuples():
        r = b.loc[(it.image_id, it.lesion)]
        assert it.label == (r.iloc[0] if isinstance(r, pd.DataFrame) else r).pathology
    assert m4['positive'] == ['malignant'] and 'test' in m4['splits']


def test_scored_on_another_version(patches, tmp_path_factory):
    """`mammo classify --on`: the tiny patch classifier on the synthetic INbreast version (its patches built with the
    classifier's settings), at the threshold chosen on the training version's val, with patient-bootstrap figures."""
    tmp, raw, f, p, r, m = patches
    _, g, _, _ = layout_version(tmp_path_factory, 'inbreast')
    out = run_here('classify', f, '--on', g, '--split', 'all')
    x = json.loads(next(Path(m['run']).glob('external/*/metrics.json')).read_text())
    s = x['splits']['all']['items']
    assert x['threshold']['value'] == m['splits']['val']['items']['threshold'] and x['trained_on'] != x['scored_on']
    items = pd.read_csv(Path(x['dataset']) / 'items.csv')
    assert s['n'] == len(items) and 0 < s['n_positive'] < s['n'] and s['unit'] == 'patient' and x['overlap']['images'] == 0
    assert 'internal test' in out.stdout and 'external' in out.stdout


def test_cams_of_the_classifier(patches):
    """Grad-CAM of the classifier: maps on the patch's grid, not constant, energy figures for abnormal patches only,
    the galleries and table in the run's cams/ folder, the summary in metrics.json."""
    from mammo_nb.classify import classifier_cams, item_scores, load_items
    tmp, raw, f, p, r, m = patches
    run, d = Path(m['run']), Path(m['dataset'])
    c = m['cams']
    assert c['split'] == 'test' and c['method'] == 'gradcam' and {x['outcome'] for x in c['summary']} <= {'TP', 'FP', 'FN'}
    T = pd.read_csv(run / 'cams' / 'cams.csv')
    assert len(T) and all((run / 'cams' / f'gallery-{o}.png').is_file() for o in set(T.outcome))
    # at imgsz 32 the last block's grid is 1 x 1: every map is flat, said so, and has no energy figures
    assert sum(x['flat_maps'] for x in c['summary']) == len(T) and T.energy_in.isna().all()
    V = load_version(version_dir(p))
    it = load_items(d, V).query("split == 'test'").reset_index(drop=True)
    s, y, _ = item_scores(p, run, d, it, m['classes'])
    # Grad-CAM++ at 96 px (a 3 x 3 grid; the network is convolutional) and threshold 0 (every positive a TP, every
    # normal an FP). (This barely trained net's Grad-CAM of "abnormal" is all zero: no location adds evidence for it.)
    M = classifier_cams(run, d, V, it, m['classes'], s, y, 0.0, 96, method='gradcam++', per_outcome=3)
    assert set(M.outcome) == {'TP', 'FP'} and (M.outcome == 'TP').sum() == min(3, int(y.sum()))
    assert all(mp.shape == (CLS['patch_size'], CLS['patch_size']) for mp in M['map'])     # on the patch's grid
    assert any(mp.std() > 0 for mp in M['map'])
    E = M[(M.label != 'normal') & M['map'].map(lambda x: x.std() > 0)]
    assert E.energy_in.between(0, 1).all() and M.energy_in[M.label == 'normal'].isna().all()


def test_every_backbone_trains_and_compares(patches):
    """Each named torchvision architecture builds, trains one epoch on the patches with BCE and pos_weight (the head
    and the top half of its stages, the first of two unfreezing steps: fewer trainable parameters than in all) and is
    scored; the list writes one comparison table with a column each. resnet18 starts from a local state dict: the
    weights reach the backbone, its stem stays frozen (the last block group to unfreeze) and layer4 trains. (The
    schedule over epochs is checked on YOLOv8-cls above.)"""
    import torch, torchvision
    from mammo_nb.classify import BACKBONES
    tmp, raw, f, p, _, _ = patches
    nets = sorted(BACKBONES)
    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp / 'r18.pth')
    g = recipe(tmp, raw, 'all', Path(p.prepare.out), model=nets, weights={'resnet18': str(tmp / 'r18.pth')}, loss='bce',
               epochs=1, warmup_balanced=0, freeze_epochs=0, unfreeze_steps=2, unfreeze_every=1, cams=0)
    out = run_here('classify', g)
    d = next((version_dir(load_params(g)) / 'classify').glob('patch-binary-*/runs/comparison-test.csv')).parent
    cmp = pd.read_csv(d / 'comparison-test.csv', index_col=0)
    assert sorted(cmp.loc['model']) == nets and len(cmp.columns) == len(nets) and set(cmp.loc['loss']) == {'bce'}
    items = pd.read_csv(next(d.parent.glob('items.csv')))
    tr = items[items.split == 'train'].label.value_counts()
    for name in nets:
        (mf,) = d.glob(f'{name}-*/metrics.json')
        m = json.loads(mf.read_text())
        sch = pd.DataFrame(m['schedule']).drop_duplicates('epoch', keep='last').set_index('epoch')
        assert 0 < len(sch.unfrozen_layers.iloc[0]) < sch.blocks.iloc[0], name                 # the top half of the stages
        assert 0 < sch.trainable_params.iloc[0] < sch.total_params.iloc[0], name
        assert (sch.loss == 'bce').all() and sch.pos_weight.iloc[0] == pytest.approx(tr['normal'] / tr['abnormal'])
        assert m['training']['epochs_done'] == 1 and m['training']['s_per_epoch'] > 0
        assert m['splits']['test']['items']['n'] == int(cmp.loc['n', Path(m['run']).name])
    m = json.loads(next(d.glob('resnet18-*/metrics.json')).read_text())
    sch = pd.DataFrame(m['schedule']).drop_duplicates('epoch', keep='last').set_index('epoch')
    assert (sch.blocks == 8).all() and sch.unfrozen_layers.tolist() == [[4, 5, 6, 7]]   # layer1-4, not the stem (conv1 bn1 relu maxpool)
    ck = torch.load(Path(m['run']) / 'weights' / 'last.pt', map_location='cpu', weights_only=False)
    bb = (ck.get('ema') or ck['model']).float().model[0].m                       # (ultralytics saves float16)
    near = lambda a, b: torch.isclose(a, b.detach(), rtol=2 ** -10, atol=2 ** -24)  # within float16 rounding
    assert near(bb[0].weight, net.conv1.weight).all()                            # loaded, and frozen throughout
    assert not near(bb[7][1].conv2.weight, net.layer4[1].conv2.weight).all()     # layer4 trained
    assert 'comparison' in out.stdout
