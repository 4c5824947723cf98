"""A second detector family: torchvision Faster R-CNN (and RetinaNet) trained on the session's tiny version beside
its YOLOv8 run, scored by the same evaluation into the same metrics.json and comparison table, resumed after a kill
to the same weights (two DDP ranks on the CPU), explained on the FPN outputs and served."""
import json, os, signal, subprocess, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import BIN, EXPLAIN, TRAIN, run_here, tiny_recipe
from mammo_nb.params import load_params
from mammo_nb.prepare import version_dir
from mammo_nb.runs import run_dir
from mammo_nb.trainutil import check_version

ARCH = 'fasterrcnn_mobilenet_v3_large_fpn'
TV = {'epochs': 2, 'imgsz': 64}


@pytest.fixture(scope='module')
def both(tiny_run, tmp_path_factory):
    """`mammo train` on a list mixing YOLOv8 and Faster R-CNN, on the session's tiny version (2 epochs at 64 px: the
    mechanics, not the learning), each trained and evaluated."""
    f0, _ = tiny_run
    p0 = load_params(f0)
    tmp = tmp_path_factory.mktemp('tvdet')
    f = tiny_recipe(tmp, p0.source.root, p0.prepare.out, train={**TRAIN, **TV, 'model': ['yolov8n.yaml', ARCH]},
                    explain={**EXPLAIN, 'methods': ['gradcam', 'eigencam'], 'max_lesions': 6, 'per_class': 1, 'n_original': 0})
    r = run_here('train', f)
    p = load_params(f)
    return tmp, f, p, r, run_dir(p, ARCH), run_dir(p, 'yolov8n.yaml')


def test_trained_and_scored_like_yolo(both):
    tmp, f, p, r, rd, yd = both
    V = check_version(p)
    tj = json.loads((rd / 'train.json').read_text())
    assert tj['family'] == 'torchvision' and tj['arch'] == ARCH and tj['epochs_done'] == 2 and tj['s_per_epoch'] > 0
    assert tj['mammo']['loss'].startswith('cross-entropy') and len(tj['mammo']['class_weights']) == len(V.manifest['classes'])
    res = pd.read_csv(rd / 'results.csv')
    assert res.epoch.tolist() == [1, 2] and res['val/fitness'].notna().all()
    # the per-epoch No-Finding draw is the YOLOv8 run's: same sampler, same seed, same images
    neg = lambda d: {json.loads(l)['epoch']: sorted(json.loads(l)['negatives']) for l in (d / 'negatives.jsonl').read_text().splitlines()}
    assert neg(rd) == neg(yd) and len(neg(rd)) == 2
    # same predictions CSV, same metrics.json structure and conventions; no ultralytics cross-check for this family
    a, b = (pd.read_csv(d / 'eval' / 'predictions-test.csv') for d in (rd, yd))
    assert list(a.columns) == list(b.columns) and len(a) and set(a.cls) <= set(V.manifest['classes'])
    test_ids = set(V.images.image_id[V.images.split == 'test'])
    assert set(a.image_id.astype(str)) <= test_ids
    m, my = (json.loads((d / 'eval' / 'metrics.json').read_text()) for d in (rd, yd))
    assert m['conventions'] == my['conventions'] and m['operating_point']['chosen_on'] == 'val'
    s = m['splits']['test']
    assert set(s['per_class']) == set(my['splits']['test']['per_class']) and s['ultralytics'] is None
    assert {'value', 'lo', 'hi'} <= set(s['all_lesions']['froc']['1']) and 'roc_auc' in s['image']
    assert (rd / 'eval' / 'test' / 'froc_roc.png').is_file()
    # side by side with YOLOv8, per class, with the family and seconds per epoch
    cmp = pd.read_csv(version_dir(p) / 'runs' / 'comparison-test.csv', index_col=0)
    assert list(cmp.columns) == [yd.name, rd.name] and cmp.loc['family'].tolist() == ['ultralytics', 'torchvision']
    assert float(cmp.loc['s / epoch', rd.name]) == tj['s_per_epoch']
    assert f'== {rd.name}' in r.stdout or rd.name in r.stdout


def test_explained_on_the_fpn_and_served(both, tiny_set):
    from fastapi.testclient import TestClient
    from mammo_nb.serve import create_app
    tmp, f, p, r, rd, yd = both
    run_here('explain', f, '--run', rd)
    ex = json.loads((rd / 'explain' / 'explain.json').read_text())
    assert ex['layers'] and all(l.startswith('backbone.fpn.layer_blocks') for l in ex['layers'])
    L = pd.read_csv(rd / 'explain' / 'lesions.csv')
    assert len(L) and set(L.method) == set(p.explain.methods) and L.energy_in.dropna().between(0, 1).all()
    assert (L.groupby('method').energy_in.count() > 0).all()           # maps with energy, not all flat
    assert ex['galleries'] and all((rd / 'explain' / g).is_file() for g in ex['galleries'])
    V = check_version(p)
    row = V.images[V.images.role == 'positive'].iloc[0]
    c = TestClient(create_app(rd, conf=0.001))
    j = c.post('/predict', files={'file': ('x.dcm', (Path(tiny_set) / row.path).read_bytes(), 'application/dicom')}).json()
    assert j['model']['run'] == rd.name and set(j['image_scores']) == set(V.manifest['classes']) and j['boxes']
    e = c.post('/explain', files={'file': ('x.dcm', (Path(tiny_set) / row.path).read_bytes(), 'application/dicom')})
    assert e.status_code == 200 and e.headers['content-type'] == 'image/png'


def test_retinanet_focal_loss_and_weights(both):
    """RetinaNet: the focal loss with class weights, one epoch, predictions in the shared CSV; a local detector state
    dict (a RetinaNet of two more classes) starts a new run, its class logits left out and rebuilt; frozen blocks
    and the loaded layers' lower learning rate."""
    from mammo_nb.evaluate import predict
    from mammo_nb.families.torchvision import build
    tmp, f, p, r, rd, yd = both
    V = check_version(p)
    net = build('retinanet_resnet50_fpn', len(V.manifest['classes']) + 2, 64)      # a detector of other classes
    torch.save(net.state_dict(), tmp / 'retina.pth')
    q = load_params(f, {'train': {'model': 'retinanet_resnet50_fpn', 'epochs': 1, 'imgsz': 64, 'weights': str(tmp / 'retina.pth'),
                                  'focal_gamma': 1.5, 'evaluate': False, 'freeze': 2, 'transfer_lr': 0.5}})
    from mammo_nb.train import train_run
    qd = train_run(q, 'retinanet_resnet50_fpn')
    tj = json.loads((qd / 'train.json').read_text())
    assert tj['mammo']['loss'] == 'sigmoid focal' and tj['mammo']['focal_gamma'] == 1.5
    assert tj['weights']['kind'] == 'detector' and tj['weights']['sha256']
    assert tj['weights']['left'] == ['head.classification_head.cls_logits.bias', 'head.classification_head.cls_logits.weight']
    # train.freeze: the body's first two blocks keep the file's weights; train.transfer_lr: loaded layers at lr x 0.5,
    # the new class logits at lr
    assert tj['weights']['frozen'] == ['conv1', 'bn1'] == tj['args']['freeze'] and tj['weights']['transfer_lr'] == 0.5
    after = torch.load(qd / 'weights' / 'last.pt', map_location='cpu', weights_only=True)['model']
    before = torch.load(tmp / 'retina.pth', map_location='cpu', weights_only=True)
    assert torch.equal(after['backbone.body.conv1.weight'], before['backbone.body.conv1.weight'])
    assert not torch.equal(after['backbone.body.layer1.0.conv1.weight'], before['backbone.body.layer1.0.conv1.weight'])
    lr = pd.read_csv(qd / 'results.csv').iloc[-1]
    assert abs(lr['lr/pg1'] - 0.5 * lr['lr/pg0']) < 1e-12
    pr = predict(qd / 'weights' / 'best.pt', V, 'val', 64, progress=False)
    assert list(pr.columns) == ['image_id', 'cls', 'class_id', 'score', 'x0', 'y0', 'x1', 'y1']
    assert len(pr) and (pr.x1 >= pr.x0).all() and (pr.y1 >= pr.y0).all() and pr.score.between(0, 1).all()


DDP_FIT = ("import sys; from pathlib import Path; from mammo_nb.params import load_params; from mammo_nb.trainutil import check_version; "
           "from mammo_nb.families.torchvision import fit; p = load_params(sys.argv[1]); fit(p, sys.argv[2], check_version(p), Path(sys.argv[3]), False, ['cpu', 'cpu'])")


def test_ddp_two_ranks_and_resume_after_kill(both, capfd):
    """torch DDP with two gloo ranks on the CPU (a GPU node runs the same code over NCCL): each rank trains its half of
    the epoch's draw at half the batch, rank 0 logs the ranks' mean and writes; killed after its first epoch and run
    again, every rank gets its own RNG state back from last.pt and the weights end bit-identical to an uninterrupted
    DDP run's. A rank whose loss diverges stops all of them with the message, not a hang."""
    import sys, yaml
    from mammo_nb.errors import TrainError
    from mammo_nb.families.torchvision import fit
    tmp, f, p, r, rd, yd = both
    d = yaml.safe_load(f.read_text())
    d['train'] = {**d['train'], 'model': ARCH, 'evaluate': False}
    g = tmp / 'ddp.yaml'; g.write_text(yaml.safe_dump(d))
    q = load_params(g)
    whole, kd = tmp / 'ddp-whole', tmp / 'ddp-killed'
    fit(q, ARCH, check_version(q), whole, False, ['cpu', 'cpu'])
    tj = json.loads((whole / 'train.json').read_text())
    draws = [json.loads(l) for l in (whole / 'negatives.jsonl').read_text().splitlines()]
    n = draws[-1]['finding'] + len(draws[-1]['negatives'])
    assert tj['ddp']['world_size'] == 2 and tj['ddp']['backend'] == 'gloo' and tj['ddp']['batch_per_rank'] == p.train.batch // 2
    assert tj['ddp']['images_last_epoch_per_rank'] == [-(-n // 2)] * 2 and tj['device'] == 'cpu,cpu'
    neg = lambda x: {json.loads(l)['epoch']: json.loads(l)['negatives'] for l in (x / 'negatives.jsonl').read_text().splitlines()}
    assert neg(whole) == neg(rd)                                         # the single-process run's draws, split between ranks
    assert pd.read_csv(whole / 'results.csv').epoch.tolist() == [1, 2] and not list(whole.glob('.ddp*'))

    proc = subprocess.Popen([sys.executable, '-c', DDP_FIT, str(g), ARCH, str(kd)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not ((kd / 'results.csv').exists() and (kd / 'weights' / 'last.pt').exists()):
        assert proc.poll() is None, 'training ended before it could be killed'
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    assert not (kd / 'train.json').exists()
    capfd.readouterr()
    fit(q, ARCH, check_version(q), kd, False, ['cpu', 'cpu'])
    assert 'resuming from epoch 2' in capfd.readouterr().err and json.loads((kd / 'train.json').read_text())['resumed_at_epoch'] == 1      # epochs done before the kill
    a, b = (torch.load(x / 'weights' / 'last.pt', map_location='cpu', weights_only=True)['model'] for x in (kd, whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    q = load_params(g, {'train': {'lr0': 1e12}})
    with pytest.raises(TrainError, match='the loss became nan'):
        fit(q, ARCH, check_version(q), tmp / 'ddp-nan', False, ['cpu', 'cpu'])
