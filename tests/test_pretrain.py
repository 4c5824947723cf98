"""`mammo pretrain` on the tiny preset in randomised looks, then a fine-tune onto the INbreast layout's other class
list: the head rebuilt, everything else transferred (equal before the first step, the frozen backbone still equal
after), the transferred layers at a lower learning rate, and the hashes chained from the fine-tuned run back to the
pretraining manifest, its weights and its dataset version."""
import hashlib, json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import ROOT, layout_version, mammo
from mammo_nb.params import load_params
from mammo_nb.errors import TrainError
from mammo_nb.runs import run_dir
from mammo_nb.train import train_run
from mammo_nb.trainutil import check_version

sha = lambda f: hashlib.sha256(Path(f).read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('pretrain')
    d = {'base': str(ROOT / 'params' / 'tiny.yaml'), 'name': 'pt',
         'synth': {'out': str(tmp / 'raw'), 'randomize': {'film': 0.5}, 'workers': 1}, 'clahe': {'off_rate': 0.3},
         'prepare': {'out': str(tmp / 'versions'), 'workers': 1},
         'train': {'epochs': 2, 'imgsz': 64, 'evaluate': False, 'close_mosaic': 0}}
    (tmp / 'pt.yaml').write_text(yaml.safe_dump(d))
    out = mammo('pretrain', tmp / 'pt.yaml').stdout
    p = load_params(tmp / 'pt.yaml')
    return tmp, p, run_dir(p, 'yolov8n.yaml'), out


def test_pretrain_writes_weights_and_manifest(pretrained):
    tmp, p, rd, out = pretrained
    V = check_version(p)
    m = json.loads((rd / 'pretrain.json').read_text())
    assert 'fine-tune: train.model:' in out and str(rd / 'weights' / 'best.pt') in out
    assert m['classes'] == list(V.manifest['classes']) and m['epochs_done'] == 2 and m['family'] == 'ultralytics'
    assert m['manifest_sha256'] == sha(V.dir / 'manifest.json') and m['version'] == V.dir.name
    assert m['weights']['best.pt']['sha256'] == sha(rd / 'weights' / 'best.pt')
    g = m['generator']
    assert g['revision'] == V.manifest['data_params']['synth']['revision'] and g['config']['randomize']['film'] == 0.5
    assert m['clahe']['off_rate'] == 0.3
    # the looks reached the files: some images are 8-bit scanned films, the rest the vendors' MONOCHROME1/2
    import pydicom
    bits = {pydicom.dcmread(f, stop_before_pixels=True).BitsStored for f in Path(p.synth.out).rglob('*.dicom')}
    assert 8 in bits and len(bits) > 1


def test_finetune_rebuilds_the_head_and_chains_the_hashes(pretrained, tmp_path_factory):
    tmp, p, rd, _ = pretrained
    _, f, _, _ = layout_version(tmp_path_factory, 'inbreast')          # other classes: 5, not VinDr's 10
    best = rd / 'weights' / 'best.pt'
    d = yaml.safe_load(f.read_text())
    d['train'] = {**d.get('train', {}), 'model': str(best), 'epochs': 2, 'imgsz': 64, 'evaluate': False, 'close_mosaic': 0,
                  'freeze': 10, 'transfer_lr': 0.1}          # no reset_head: mammo pretrain's weights get a new head
    g = tmp / 'ft.yaml'; g.write_text(yaml.safe_dump(d))
    q = load_params(g)
    V = check_version(q)
    assert V.manifest['classes'] != json.loads((rd / 'pretrain.json').read_text())['classes']
    import shutil
    shutil.copy(best, tmp / 'other.pt')                                 # weights of other classes, not from mammo pretrain:
    with pytest.raises(TrainError, match='reset_head'):                 # without reset_head refused, not silently cut
        train_run(load_params(g, {'train': {'reset_head': False}}), str(tmp / 'other.pt'), V)
    fd = train_run(q, str(best), V)
    tr = json.loads((fd / 'transfer.json').read_text())
    assert tr['head'] == 'rebuilt' and tr['new_layers'] and all(l.startswith('model.22.cv3.') for l in tr['new_layers'])
    assert tr['transferred'] == len(tr['transferred_names']) and tr['transferred'] > 0.9 * tr['tensors']
    # transferred = equal to the pretrained tensors before the first step (transfer_report's torch.equal); the frozen
    # backbone (modules 0-9) is still equal after two epochs, the rebuilt head has the version's classes
    from ultralytics.nn.tasks import load_checkpoint
    a = load_checkpoint(str(best))[0].state_dict()
    b = load_checkpoint(str(fd / 'weights' / 'last.pt'))[0]
    assert b.names == dict(enumerate(V.manifest['classes']))
    sb = dict(b.named_parameters())
    back = [k for k in sb if int(k.split('.')[1]) < 10]
    assert back and all(torch.allclose(sb[k].float(), a[k].float(), atol=1e-3) for k in back)
    assert any(not torch.allclose(sb[k].float(), a[k].float()) for k in sb if k.startswith('model.15.'))   # the neck learns
    # the transferred layers in their own groups at lr x 0.1 (ultralytics logs every group's lr)
    res = pd.read_csv(fd / 'results.csv', skipinitialspace=True)
    lrs = res.filter(like='lr/pg').iloc[-1].to_numpy()
    assert len(lrs) == 6 and all(abs(lrs[i + 3] - 0.1 * lrs[i]) < 1e-9 for i in range(3))
    # the hashes chain: fine-tuned run -> weights file -> pretrain.json -> the pretraining version's manifest
    w = json.loads((fd / 'train.json').read_text())['weights']
    assert w['sha256'] == sha(best) == json.loads((rd / 'pretrain.json').read_text())['weights']['best.pt']['sha256']
    assert w['pretrain']['sha256'] == sha(rd / 'pretrain.json') and w['head'] == 'rebuilt'
    Vp = check_version(p)
    assert w['pretrain']['version'] == Vp.dir.name and w['pretrain']['version_manifest_sha256'] == sha(Vp.dir / 'manifest.json')
    assert w['freeze'] == 10 and w['transfer_lr'] == 0.1 and 'transferred_names' not in w


def test_classify_starts_from_the_pretrained_backbone(pretrained):
    """The classification track from the same weights: `classify.weights` gives a YOLOv8-cls model the pretrained
    detector's backbone (layers 0-8 copied and equal at the start, the `Classify` head new), and the run is scored."""
    from mammo_nb.classify import classify
    tmp, p, rd, _ = pretrained
    best = rd / 'weights' / 'best.pt'
    d = yaml.safe_load((tmp / 'pt.yaml').read_text())
    d['classify'] = {'task': 'patch', 'patch_size': 48, 'patch_stride': 24, 'imgsz': 32, 'epochs': 1, 'batch': 8,
                     'warmup_balanced': 0, 'freeze_epochs': 0, 'unfreeze_steps': 1, 'normal_ratio': 1.0, 'normal_margin': 4,
                     'model': 'yolov8n-cls.yaml', 'weights': str(best), 'cams': 0}
    g = tmp / 'cls.yaml'; g.write_text(yaml.safe_dump(d))
    m = classify(load_params(g))
    tr = json.loads((Path(m['run']) / 'transfer.json').read_text())
    assert {int(k.split('.')[1]) for k in tr['transferred_names']} == set(range(9)) and tr['head'] == 'rebuilt'
    assert m['weights'] == str(best) and 'roc_auc' in m['splits']['val']['items']
