"""`mammo train` / `mammo evaluate` on the tiny preset: real ultralytics training, the imbalance machinery doing
what it claims, resume after a kill, clear errors and model comparison (the report notebook: tests/test_pipeline.py)."""
import json, shutil, signal, subprocess, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import BIN, ROOT, TRAIN, cli, mammo, run_here, tiny_recipe
from mammo_nb.families.ultralytics import library_val
from mammo_nb.params import load_params
from mammo_nb.prepare import version_dir
from mammo_nb.families.ultralytics import MammoTrainer, MammoDetectionLoss, FocalBCE, write_run_data, train_args
from mammo_nb.runs import run_dir
from mammo_nb.trainutil import check_version


recipe = tiny_recipe


@pytest.fixture(scope='module')
def trained(tiny_run):
    "The session's tiny run (prepared, trained 3 epochs and evaluated through the CLI)."
    f, r = tiny_run
    return f, load_params(f), r


def test_train_then_evaluate_end_to_end(trained):
    f, p, r = trained
    rd = run_dir(p, 'yolov8n.yaml')
    assert rd.parent == version_dir(p) / 'runs'
    for name in ('args.yaml', 'results.csv', 'weights/best.pt', 'weights/last.pt', 'train.json', 'negatives.jsonl',
                 'data.yaml', 'eval/metrics.json', 'eval/predictions-val.csv', 'eval/predictions-test.csv',
                 'eval/test/froc_roc.png'):
        assert (rd / name).is_file(), name
    assert not (rd / 'eval/test/BoxPR_curve.png').exists()               # tiny.yaml: evaluate.plots false
    tj = json.loads((rd / 'train.json').read_text())
    assert tj['status'] == 'done' and tj['epochs_done'] == 3 and tj['version'] == version_dir(p).name
    assert len((rd / 'results.csv').read_text().splitlines()) == 1 + 3
    m = json.loads((rd / 'eval' / 'metrics.json').read_text())
    assert set(m['splits']) == {'val', 'test'} and m['operating_point']['chosen_on'] == 'val'
    c = m['conventions']
    assert 'IoU >= 0.3' in c['froc_hit'] and m['bootstrap']['unit'] == 'patient' and c['bootstrap']['n'] == p.evaluate.bootstrap
    assert 'ignored' in c['froc_second_mark'] and f'IoU {p.evaluate.pooled_nms_iou}' in c['pooled_nms'] and 'pycocotools' in c['ap']
    assert tj['cpu'] == {'threads': len(__import__('os').sched_getaffinity(0)), 'workers': p.train.cpu_workers}   # every core
    s = m['splits']['test']
    assert s['n_detection_images'] == len((version_dir(p) / 'test.txt').read_text().split())   # image-level ones: AUC only
    assert set(s['all_lesions']['froc']) == {'0.125', '0.25', '0.5', '1', '2', '4'}
    assert s['per_class']['Mass']['n_gt'] == int((pd.read_csv(version_dir(p) / 'boxes.csv').query("split == 'test'").cls == 'Mass').sum())
    for k in ('roc_auc', 'pr_auc'): assert k in s['image'] and k in s['breast']
    pred = pd.read_csv(rd / 'eval' / 'predictions-test.csv')
    assert len(pred) and pred.score.between(0, 1).all() and (pred.x1 > pred.x0).all()
    assert 'test all-lesion sens@1FP' in r                  # the CLI prints the headline figures
    # rerunning the recipe finds the finished run: nothing retrained, evaluation reused
    before = (rd / 'train.json').stat().st_mtime_ns, (rd / 'eval/metrics.json').stat().st_mtime_ns
    run_here('train', f)
    assert ((rd / 'train.json').stat().st_mtime_ns, (rd / 'eval/metrics.json').stat().st_mtime_ns) == before


class RecordingTrainer(MammoTrainer):
    "Records the image files of every training batch, per epoch (what the model actually saw)."
    seen: dict = {}
    def preprocess_batch(self, batch):
        RecordingTrainer.seen.setdefault(self.epoch, []).extend(Path(f).stem for f in batch['im_file'])
        return super().preprocess_batch(batch)


def test_sampler_changes_the_epoch_image_set_and_weights_reach_the_loss(trained, tmp_path):
    from ultralytics import YOLO
    f, p, _ = trained
    V = check_version(p)
    rd = V.dir / 'runs' / 'recording'
    data = write_run_data(p, V, rd)
    RecordingTrainer.seen = {}
    y = YOLO('yolov8n.yaml')
    y.train(trainer=RecordingTrainer, **train_args(p, 'yolov8n.yaml', data, 'cpu'))
    tr = y.trainer
    im = V.images[V.images.split == 'train']
    finding, negatives = set(im[im.role == 'positive'].image_id), set(im[im.role == 'negative'].image_id)
    logged = {json.loads(l)['epoch']: set(json.loads(l)['negatives']) for l in (rd / 'negatives.jsonl').read_text().splitlines()}
    drawn = []
    for e in range(3):
        seen = set(RecordingTrainer.seen[e])
        assert finding <= seen                                # every finding image, every epoch
        neg = seen & negatives
        assert len(neg) == 2 and neg == logged[e]             # ratio 0.34 x 6 -> 2 No-Finding, exactly those logged
        drawn.append(frozenset(neg))
    assert len(set(drawn)) > 1                                # a different draw in some epoch (seeded: always the same runs)
    # the manifest's counts became the loss weights, and the criterion that trained is ours
    counts = V.manifest['counts']['boxes_per_class']
    n = np.array([counts[c].get('train', 0) for c in V.manifest['classes']], float)
    w = np.where(n > 0, n, np.nan) ** -p.train.class_weight_power
    w = np.where(np.isnan(w), np.nanmean(w), w); w /= w.mean()
    crit = tr.model.criterion
    assert isinstance(crit, MammoDetectionLoss)
    np.testing.assert_allclose(crit.class_weights.flatten().cpu().numpy(), w, rtol=1e-4)
    # ...and they change the loss on a real training batch
    batch = tr.preprocess_batch(next(iter(tr.train_loader)))
    tr.model.eval()
    with torch.no_grad():
        preds = tr.model(batch['img'])
        weighted = crit(preds, batch)[1]['cls_loss']
        crit.class_weights = None
        plain = crit(preds, batch)[1]['cls_loss']
        focal = MammoDetectionLoss(tr.model, focal_gamma=2.0)
        assert isinstance(focal.bce, FocalBCE)
        focal.class_weights = None
        fl = focal(preds, batch)[1]['cls_loss']
    assert abs(float(weighted) - float(plain)) > 1e-3 * float(plain)
    assert abs(float(fl) - float(plain)) > 1e-3 * float(plain)       # the focal term reaches the batch's loss


def test_focal_bce_known_values():
    "BCE x |t - sigmoid(x)|^gamma at hand-computed points (not an inequality every input satisfies)."
    x, t = torch.tensor([0., 2., -1.]), torch.tensor([1., 0., 0.25])
    # x=0, t=1: ln 2 x 0.5^2; x=2, t=0: softplus(2) x sigmoid(2)^2; x=-1, t=.25: BCE 0.5633 x |.25 - .2689|^2
    torch.testing.assert_close(FocalBCE(2.0)(x, t), torch.tensor([0.1732868, 1.6500781, 0.00020209]), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(FocalBCE(0.0)(x, t), torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction='none'))


def test_resume_after_kill(trained, tmp_path):
    _, p, _ = trained                                          # the session's version, a run of its own
    f = recipe(tmp_path, p.source.root, p.prepare.out, train={'epochs': 4, 'evaluate': False, 'val_every': 2, 'run_name': 'killed'})
    rd = run_dir(load_params(f), 'yolov8n.yaml')
    assert rd == version_dir(p) / 'runs' / 'killed'
    proc = subprocess.Popen([str(BIN / 'mammo'), 'train', str(f)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        res = rd / 'results.csv'
        if res.exists() and len(res.read_text().splitlines()) >= 3 and (rd / 'weights/last.pt').exists(): break
        assert proc.poll() is None, 'training ended before it could be killed'
        time.sleep(0.2)
    import os; os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    done_before = len((rd / 'results.csv').read_text().splitlines()) - 1
    assert 2 <= done_before < 4 and not (rd / 'train.json').exists()
    last = rd / 'weights' / 'last.pt'                          # a kill can land while last.pt is written: tear it
    last.write_bytes(last.read_bytes()[:len(last.read_bytes()) // 2])
    r = mammo('train', f)
    assert 'resuming training from best.pt' in r.stderr + r.stdout   # from best.pt, which holds the same training state
    assert (rd / 'weights' / 'last.pt.torn').exists()
    tj = json.loads((rd / 'train.json').read_text())
    assert tj['epochs_done'] == 4
    res = pd.read_csv(rd / 'results.csv')
    assert res.epoch.tolist() == list(range(1, 5))            # no epoch lost or repeated
    # validated every 2nd epoch: the others log no metrics, so only epochs 2 and 4 could become best.pt
    assert res['metrics/mAP50(B)'].isna().tolist() == [True, False] * 2


def test_clear_errors(trained, tiny_set, tmp_path):
    f, p, _ = trained
    # the recipe's version was never built
    g = recipe(tmp_path, tiny_set, tmp_path / 'nowhere', name='missing')
    r = cli('train', g)
    assert r.returncode == 2 and 'dataset version missing' in r.stderr and 'mammo prepare' in r.stderr
    # a version edited after it was built is stale, and the message names the file
    out = tmp_path / 'copy'
    shutil.copytree(version_dir(p), out / version_dir(p).name, ignore=shutil.ignore_patterns('runs'))
    h = recipe(tmp_path, tiny_set, out, name='stale', train=TRAIN)
    lab = next((out / version_dir(p).name / 'labels').rglob('*.txt'))
    lab.write_text(lab.read_text() + '0 0.5 0.5 0.1 0.1\n')
    r = cli('train', h)
    assert r.returncode == 2 and 'stale' in r.stderr and lab.name in r.stderr
    # CUDA asked for on a machine without it
    if not torch.cuda.is_available():
        r = cli('train', f, '--device', '0')
        assert r.returncode == 2 and "'train.device' is '0' but CUDA is not available" in r.stderr
    # weights trained on 11 classes offered to a 1-class version
    k = recipe(tmp_path, tiny_set, tmp_path / 'one', name='oneclass', prepare={'classes': ['Mass'], 'priority': ['Mass']})
    mammo('prepare', k, '--quiet')
    best = run_dir(p, 'yolov8n.yaml') / 'weights' / 'best.pt'
    r = cli('train', k, '--model', best)
    assert r.returncode == 2 and 'was trained on 11 classes' in r.stderr and 'has 1' in r.stderr


def test_model_comparison_table(trained, tiny_set, tmp_path):
    f, p, _ = trained
    g = recipe(tmp_path, tiny_set, Path(p.prepare.out), name='cmp',
               train={**TRAIN, 'model': ['yolov8n.yaml', 'yolo11n.yaml', 'yolov8n-p2.yaml']})
    assert run_dir(load_params(g), 'yolov8n.yaml') == run_dir(p, 'yolov8n.yaml')   # the session's run: found finished
    r = run_here('train', g)                                          # yolo11n and the stride-4 head (P2) train
    cmp = version_dir(p) / 'runs' / 'comparison-test.csv'
    assert str(cmp) in r.stdout
    t = pd.read_csv(cmp, index_col=0)
    assert [c.split('-')[0] for c in t.columns] == ['yolov8n', 'yolo11n', 'yolov8n']     # other models, one interface
    assert t.columns[2].startswith('yolov8n-p2-')
    assert 'Mass' in t.index and 'image ROC-AUC' in t.index
    # the P2 run is evaluated like any other, and its maps come from the four layers its head reads (strides 4-32)
    from mammo_nb.families import family_of_weights
    from mammo_nb.runs import RunDir
    p2 = RunDir(run_dir(load_params(g), 'yolov8n-p2.yaml'))
    assert set(p2.metrics['splits']) == {'val', 'test'} and 'Suspicious Calcification' in p2.metrics['splits']['test']['per_class']
    ex = family_of_weights(p2.best).explainer(p2.best, 128)
    assert len(ex.idx) == 4 and ex.det.strides == [4, 8, 16, 32]


def _weights(rd: Path) -> dict:
    ck = torch.load(rd / 'weights' / 'last.pt', map_location='cpu', weights_only=False)
    m = ck.get('ema') or ck['model']
    return {k: v.float() for k, v in m.state_dict().items() if v.is_floating_point()}


def test_validator_counts_the_confusion_matrix_without_drawing(trained, tmp_path):
    """`evaluate.plots: false` (tiny.yaml) skips ultralytics' figures, not its confusion matrix: the counts in
    metrics.json equal those of a validation that draws (ultralytics ties both to `args.plots`)."""
    f, p, _ = trained
    rd = run_dir(p, 'yolov8n.yaml')
    cm = json.loads((rd / 'eval' / 'metrics.json').read_text())['splits']['test']['ultralytics']['confusion_matrix']
    drawn = load_params(f, {'evaluate': {'plots': True}})
    ul = library_val(rd / 'weights/best.pt', rd / 'data.yaml', 'test', tmp_path / 'test', p.train.imgsz, drawn)
    assert ul['confusion_matrix'] == cm and sum(map(sum, cm)) > 0
    assert {'BoxPR_curve.png', 'confusion_matrix_normalized.png'} <= {x.name for x in (tmp_path / 'test').iterdir()}


def test_same_seed_and_threads_give_identical_weights(trained):
    """Two runs with the same seed and `train.threads` end with bit-identical weights; one thread instead of two
    changes float summation order only (difference recorded in the assertion's tolerance)."""
    from mammo_nb.train import train_run
    f, p, _ = trained
    out, before = {}, torch.get_num_threads()
    try:
        for name, threads in (('repro-a', 2), ('repro-b', 2), ('repro-1', 1)):   # in this process: `mammo train`'s stage function
            g = recipe(Path(f).parent, p.source.root, p.prepare.out, name=name,
                       train={**TRAIN, 'epochs': 1, 'run_name': name, 'threads': threads, 'evaluate': False})
            rd = train_run(load_params(g), 'yolov8n.yaml')
            assert rd == version_dir(p) / 'runs' / name
            assert json.loads((rd / 'train.json').read_text())['cpu']['threads'] == threads
            out[name] = _weights(rd)
    finally: torch.set_num_threads(before)
    a, b, one = out['repro-a'], out['repro-b'], out['repro-1']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    diff = max(float((a[k] - one[k]).abs().max()) for k in a)
    assert diff < 1e-3, diff          # 1 vs 2 threads, 1 epoch: 6.1e-5 measured (weights up to 15): float reassociation only
