"""Self-supervised pretraining (`mammo_nb.selfsup`) on the tiny set: one epoch of VICReg on YOLOv8n's and a torchvision
detector's backbone, fine-tuning from each (every backbone tensor equal to the file's before the first step), and the
rule that no val or test image enters a pretraining, asserted from the hashes `pretrain.json` records: a version's
held-out splits, and a folder of unlabelled files holding copies of the test images, a hostile link and a broken file."""
import hashlib, json, os, shutil
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_here, tiny_recipe
from mammo_nb.errors import TrainError
from mammo_nb.params import load_params
from mammo_nb.runs import run_dir
from mammo_nb.selfsup import check_unseen, learn_backbone, version_images
from mammo_nb.train import train_run
from mammo_nb.trainutil import check_version

SSL = {'epochs': 1, 'crops': 2, 'batch': 8, 'crop': 128}
TRAIN = {'epochs': 1, 'evaluate': False, 'close_mosaic': 0}
sha = lambda f: hashlib.sha256(Path(f).read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def tiny(tiny_set, tmp_path_factory):
    "The tiny set prepared, and a folder of unlabelled files: every raw image (test ones among them), a link out, junk."
    tmp = tmp_path_factory.mktemp('ssl')
    f = tiny_recipe(tmp, tiny_set, tmp / 'versions', train=TRAIN)
    run_here('prepare', f, '--quiet')
    p = load_params(f)
    V = check_version(p)
    un = tmp / 'unlabelled'; (un / 'site').mkdir(parents=True)
    for i, src in enumerate(sorted(tiny_set.rglob('*.dicom'))): shutil.copy(src, un / 'site' / f'{i:03d}.dcm')
    (un / 'site' / 'broken.dcm').write_bytes(b'DICM' + os.urandom(300))
    secret = tmp / 'outside.png'; secret.write_bytes((V.dir / V.images.png.iloc[0]).read_bytes())
    (un / 'link.png').symlink_to(secret)
    (un / 'notes.txt').write_text('not an image')
    return tmp, f, p, V, un


def test_yolo_backbone_learns_and_transfers(tiny):
    tmp, f, p, V, un = tiny
    q = load_params(f, {'ssl': SSL, 'train': {'ssl': True}})
    rd = train_run(q, 'yolov8n.yaml', V)
    rec = json.loads((rd / 'train.json').read_text())
    d = Path(rec['ssl']['file']).parent
    m = json.loads((d / 'pretrain.json').read_text())
    assert m['method'] == 'ssl' and m['epochs_done'] == 1 and all(x == x for x in m['loss'])    # one epoch, a finite loss
    assert m['crops_per_epoch'] == 2 * m['images']['n_version'] and m['images']['n_folders'] == 0
    # the run started from the learned weights: every backbone tensor (modules 0-9) equal to the file's before the first step
    tr = json.loads((rd / 'transfer.json').read_text())
    from ultralytics.nn.tasks import load_checkpoint
    sd = load_checkpoint(m['fine_tune']['model'])[0].state_dict()
    back = [k for k in sd if k.startswith('model.') and int(k.split('.')[1]) < 10]
    assert back and set(back) <= set(tr['transferred_names'])
    assert rec['weights']['sha256'] == sha(m['fine_tune']['model']) and rec['weights']['pretrain']['sha256'] == sha(d / 'pretrain.json')
    # ... and the backbone did learn: it started as the seeded random initialisation the .yaml builds (the neck, which
    # SSL does not train, is still exactly that, in half precision) and its weights moved away from it
    from ultralytics.nn.tasks import DetectionModel
    torch.manual_seed(q.ssl.seed)
    fresh = DetectionModel('yolov8n.yaml', nc=len(V.manifest['classes']), verbose=False).state_dict()
    neck = [k for k in sd if k.startswith('model.12.') and 'weight' in k]
    assert neck and all(torch.equal(fresh[k].half().float(), sd[k].float()) for k in neck)
    assert any(not torch.equal(fresh[k].half().float(), sd[k].float()) for k in back if k.endswith('conv.weight'))
    # the run's name says it started from a pretraining: not the run trained from scratch
    assert rd.name != run_dir(load_params(f), 'yolov8n.yaml').name


def test_no_held_out_image_enters_a_pretraining(tiny):
    tmp, f, p, V, un = tiny
    q = load_params(f, {'ssl': {**SSL, 'folders': [str(un)]}})
    d = learn_backbone(q, 'yolov8n.yaml', V, ['train'], progress=False)
    m = json.loads((d / 'pretrain.json').read_text())
    seen = m['images']['version'] + m['images']['folders']
    held = version_images(V, ['val', 'test'])
    assert len(held) and not ({r['sha256'] for r in seen} & set(held.sha256))
    assert not ({r['pixel_fingerprint'] for r in seen} & set(held.pixel_fingerprint))
    assert {r['image_id'] for r in m['images']['version']} == set(V.images.image_id[V.images.split == 'train'])
    # the folder: the raw copies of the val and test images left out by their pixels, the others learned from
    assert m['images']['left_out_held_out'] == len(held) and m['images']['n_folders'] == len(V.images) - len(held)
    reasons = {x['file']: x['reason'] for x in m['images']['failures']}
    assert reasons['link.png'] == 'path_outside_root' and 'site/broken.dcm' in reasons and 'notes.txt' not in reasons
    assert m['images']['n_failures'] == len(reasons) == 2
    assert check_unseen(m['fine_tune']['model'], V)['images'] == len(seen)       # fine to start from
    with pytest.raises(TrainError, match='strict'):                              # strict: the first bad file fails
        learn_backbone(load_params(f, {'strict': True, 'ssl': {**SSL, 'folders': [str(un)], 'seed': 1}}), 'yolov8n.yaml', V, ['train'], progress=False)


def test_transductive_weights_refused_unless_the_recipe_says_so(tiny):
    tmp, f, p, V, un = tiny
    q = load_params(f, {'ssl': SSL})
    d = learn_backbone(q, 'yolov8n.yaml', V, ['train', 'val'], progress=False)
    w = json.loads((d / 'pretrain.json').read_text())['fine_tune']['model']
    with pytest.raises(TrainError, match='transductive'):
        train_run(load_params(f), w, V)
    with pytest.raises(TrainError, match='never learns from test'):
        learn_backbone(q, 'yolov8n.yaml', V, ['train', 'test'], progress=False)
    assert check_unseen(w, V, transductive=True)['transductive'] is True


def test_torchvision_backbone_learns_and_transfers(tiny):
    tmp, f, p, V, un = tiny
    arch = 'fasterrcnn_mobilenet_v3_large_320_fpn'
    q = load_params(f, {'ssl': SSL, 'train': {'ssl': True, 'model': arch}})
    rd = train_run(q, arch, V)
    rec = json.loads((rd / 'train.json').read_text())
    d = Path(rec['ssl']['file']).parent
    w = d / 'weights' / 'backbone.pt'
    assert rec['weights']['kind'] == 'backbone' and rec['weights']['left'] == 0 and rec['weights']['sha256'] == sha(w)
    assert rec['weights']['tensors'] == len(torch.load(w, weights_only=True))
    # the body started as the file: its tensors, loaded into a fresh detector, are the file's
    from mammo_nb.families.torchvision import build, load_weights
    net = build(arch, len(V.manifest['classes']), q.train.imgsz)
    load_weights(net, w)
    sd, body = torch.load(w, weights_only=True), net.backbone.body.state_dict()
    assert all(torch.equal(body[k.removeprefix('features.')], v) for k, v in sd.items())


def test_mammo_pretrain_ssl_on_a_version(tiny):
    "`mammo pretrain` with pretrain.method: ssl learns from the version's train split and says how to fine-tune."
    tmp, f, p, V, un = tiny
    import yaml
    d = yaml.safe_load(f.read_text()); d.update(pretrain={'method': 'ssl'}, ssl=SSL)
    g = tmp / 'pt-ssl.yaml'; g.write_text(yaml.safe_dump(d))
    out = run_here('pretrain', g).stdout
    assert 'ssl (VICReg) on' in out and '(train) + 0 from ssl.folders' in out and 'fine-tune: train.model:' in out
    w = out.split('fine-tune: train.model: ')[1].split()[0]
    assert json.loads((Path(w).parent.parent / 'pretrain.json').read_text())['splits'] == ['train']
    d['pretrain'] = {'method': 'synthetic+ssl'}; g.write_text(yaml.safe_dump(d))          # needs synthetic weights to start from
    from conftest import cli
    r = cli('pretrain', g)
    assert r.returncode == 2 and 'no pretrain.json' in r.stderr and 'Traceback' not in r.stderr


def test_a_torchvision_backbone_file_serves_the_classifier_too(tmp_path):
    "The ResNet-50 body of Faster R-CNN, saved as `save_trunk` saves it, loads into the patch classifier's resnet50."
    from mammo_nb.classify import load_backbone, model_file
    from mammo_nb.families.torchvision import TorchvisionFamily
    from ultralytics.nn.tasks import ClassificationModel
    F = TorchvisionFamily()
    t = F.trunk('fasterrcnn_resnet50_fpn', ['Mass'], 64)
    w = F.save_trunk(t, 'fasterrcnn_resnet50_fpn', tmp_path)['weights']
    m = ClassificationModel(model_file('resnet50', tmp_path), nc=2, verbose=False)
    n = load_backbone(m, 'resnet50', w)
    kept = m.model[0].m.state_dict()
    assert n == len(kept) and all(torch.equal(v, t.body.state_dict()[k]) for k, v in zip(
        [k for k in t.body.state_dict() if not k.startswith('fc.')], kept.values()))
    torch.save({'conv1.weight': torch.zeros(1)}, tmp_path / 'bad.pt')
    with pytest.raises(TrainError, match='not a resnet50 state dict'): load_backbone(m, 'resnet50', tmp_path / 'bad.pt')
