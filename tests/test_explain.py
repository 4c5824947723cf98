"""`mammo explain` on a tiny trained run: map shapes on the PNG and original grids, non-constant maps, boxes drawn
where the lesions are, and the per-class energy table."""
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import run_here
from mammo_nb.clahe import to_original
from mammo_nb.metrics import box_iou
from mammo_nb.explain import to_original_grid
from mammo_nb.families.ultralytics import Detector, letterbox, unletterbox, cam, BoxClassTarget, anchor_centres, head_inputs
from mammo_nb.ingest import ingest
from mammo_nb.params import load_params
from mammo_nb.prepare import load_version, read_source, source_root
from mammo_nb.runs import run_dir


@pytest.fixture(scope='module')
def explained(tiny_run):
    "CAMs of the session's tiny run (its recipe's explain section: threshold 0.001, 2 per class, 300 lesions)."
    f, _ = tiny_run
    r = run_here('explain', f)
    p = load_params(f)
    return p, run_dir(p, 'yolov8n.yaml'), r


def test_explain_outputs_and_table(explained):
    p, rd, r = explained
    ex = json.loads((rd / 'explain' / 'explain.json').read_text())
    V = load_version(p)
    n_les = int((V.boxes.split == 'test').sum())
    L = pd.read_csv(rd / 'explain' / 'lesions.csv')
    assert len(L) == 3 * n_les and set(L.method) == {'gradcam', 'gradcam++', 'eigencam'}
    assert set(L.outcome) <= {'TP', 'FN'} and L.energy_in.dropna().between(0, 1).all()
    S = pd.read_csv(rd / 'explain' / 'summary.csv')
    assert {'pointing', 'energy_in', 'energy_ratio', 'lesions'} <= set(S.columns)
    assert S.groupby('method').lesions.sum().eq(n_les).all()
    assert ex['galleries'] and all((rd / 'explain' / g).is_file() for g in ex['galleries'])
    assert ex['originals'] and (rd / 'explain' / ex['originals'][0]).is_file()


def test_maps_have_the_image_shape_and_are_not_constant(explained):
    p, rd, _ = explained
    V = load_version(p)
    im = V.images[(V.images.split == 'test') & (V.images.role == 'positive')].iloc[0]
    b = V.boxes[V.boxes.image_id == im.image_id].iloc[0]
    png = cv2.imread(str(V.dir / im.png), cv2.IMREAD_UNCHANGED)
    det = Detector(rd / 'weights' / 'best.pt')
    x, lb = letterbox(png, p.train.imgsz)
    r, px, py = lb
    t = BoxClassTarget(int(b.class_id), (b.x0 * r + px, b.y0 * r + py, b.x1 * r + px, b.y1 * r + py),
                       anchor_centres(p.train.imgsz, det.strides))
    g = ingest(source_root(p) / im.path, p.prepare.margin)
    for method in ('gradcam', 'gradcam++', 'eigencam'):
        m = unletterbox(cam(det, x, method, list(p.explain.layers or head_inputs(det.m)), t), lb, png.shape)
        assert m.shape == png.shape and np.isfinite(m).all()
        assert m.std() > 1e-3, f'{method} map is constant'
        o = to_original_grid(m, im.crop, g.image.shape)
        assert o.shape == g.image.shape
        x0, y0, x1, y1 = im.crop
        assert o[:y0].sum() == 0 and o[y1:].sum() == 0 and o[:, x1:].sum() == 0   # nothing outside the breast crop


def test_overlay_boxes_sit_on_the_lesions(explained):
    "The boxes drawn on the original mammogram (dataset boxes through to_original) are the source's lesion boxes."
    p, rd, _ = explained
    V = load_version(p)
    _, src, _ = read_source(p)
    test = V.boxes[V.boxes.split == 'test']
    im = V.images.set_index('image_id')
    for b in test.itertuples():
        r = im.loc[b.image_id]
        drawn = to_original(np.array([[b.x0, b.y0, b.x1, b.y1]]), r.crop, r.scale)
        truth = src[src.image_id == b.image_id][['x0', 'y0', 'x1', 'y1']].to_numpy(float)
        assert box_iou(drawn, truth).max() > 0.9, (b.image_id, drawn, truth)
