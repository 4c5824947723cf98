"""Tiled training on the session's tiny version: tiles derived like a fold version (no re-ingest, the parent's groups
and splits, a manifest naming the parent and the tiling), their boxes mapping back to the version's exactly, and both
detector families trained on them and scored on whole images through sliced inference, never on whole images unasked."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import EXPLAIN, TRAIN, run_here, tiny_recipe
from mammo_nb.errors import TrainError
from mammo_nb.evaluate import evaluate_run
from mammo_nb.params import load_params
from mammo_nb.runs import RunDir, run_dir, tile_settings
from mammo_nb.split import group_keys
from mammo_nb.tiles import tile_version
from mammo_nb.trainutil import check_version

TILES = {'size': 128, 'overlap': 0.25}


@pytest.fixture(scope='module')
def tiled(tiny_run):
    f, _ = tiny_run
    p = load_params(f)
    V = check_version(p)
    return p, V, tile_version(V, tile_settings(TILES, p.train.imgsz), progress=False)


def test_tiles_map_back_to_the_versions_boxes(tiled):
    p, V, T = tiled
    assert T.dir.parent == V.dir.parent and T.manifest['derived_from']['version'] == V.manifest['version']
    assert T.manifest['tiles']['parent'] == V.manifest['version'] and T.manifest['tiles']['size'] == 128
    assert (T.dir / 'images').is_dir() and not (T.dir / 'images').is_symlink()     # its own PNGs, hashed in its manifest
    assert all(rel in T.manifest['files'] for rel in T.images.png)
    assert tile_version(V, tile_settings(TILES, p.train.imgsz), progress=False).dir == T.dir   # reused, not cut again
    # every tile keeps its image's study, patient and split: the same groups, no image in two splits
    parent = T.images.image_id.str.rsplit('-', n=2).str[0]
    assert parent.isin(V.images.image_id).all()
    src = V.images.set_index('image_id')
    assert (T.images.split.values == src.split[parent].values).all() and (T.images.study_id.values == src.study_id[parent].values).all()
    g = dict(zip(V.images.image_id, group_keys(V.images)))
    assert (group_keys(T.images).values == parent.map(g).values).all()
    # a box wholly inside a tile comes back exactly at its place in the version's image
    tb = T.boxes.assign(parent=T.boxes.image_id.str.rsplit('-', n=2).str[0],
                        ox=T.boxes.image_id.str.rsplit('-', n=2).str[1].astype(int), oy=T.boxes.image_id.str.rsplit('-', n=2).str[2].astype(int))
    whole, checked = tb[~tb.clipped], 0
    for b in V.boxes.itertuples():
        m = whole[(whole.parent == b.image_id) & (whole.cls == b.cls)]
        back = m[['x0', 'y0', 'x1', 'y1']].to_numpy() + m[['ox', 'oy', 'ox', 'oy']].to_numpy()
        hit = np.abs(back - [b.x0, b.y0, b.x1, b.y1]).max(1) < 2e-3 if len(m) else np.zeros(0, bool)
        inside = any(x0 <= b.x0 and y0 <= b.y0 and b.x1 <= x0 + 128 and b.y1 <= y0 + 128
                     for x0, y0 in {(int(i.rsplit('-', 2)[1]), int(i.rsplit('-', 2)[2])) for i in T.images.image_id[parent == b.image_id]})
        if inside: assert hit.any(), b; checked += 1
    assert checked >= 10
    # YOLO labels are the tile boxes; a tile without findings has an empty label file and role negative
    t = T.images[T.images.role == 'positive'].iloc[0]
    lines = (T.dir / 'labels' / t.study_id / f'{t.image_id}.txt').read_text().split('\n')[:-1]
    assert len(lines) == (T.boxes.image_id == t.image_id).sum()
    n = T.images[T.images.role == 'negative'].iloc[0]
    assert (T.dir / 'labels' / n.study_id / f'{n.image_id}.txt').read_text() == '' and n.labels == ['No Finding']
    assert set(T.images.role) <= {'positive', 'negative', 'image_level'} and (T.images.role == 'negative').sum() > 0


def test_both_families_train_on_tiles_and_are_scored_by_slices(tiny_run, tmp_path):
    """`mammo train` with train.tiles: YOLOv8 and Faster R-CNN train on the tile version (1 epoch), each run lives in it,
    and each is evaluated on the version's whole images through sliced inference; scoring it on whole images without
    slices is refused (unless `evaluate.whole_images`)."""
    f0, _ = tiny_run
    p0 = load_params(f0)
    f = tiny_recipe(tmp_path, p0.source.root, p0.prepare.out,
                    train={**TRAIN, 'epochs': 1, 'tiles': TILES, 'model': ['yolov8n.yaml', 'fasterrcnn_mobilenet_v3_large_fpn']},
                    evaluate={'slices': {'window': 128, 'overlap': 0.25}}, explain={**EXPLAIN, 'methods': ['eigencam', 'gradcam']})
    run_here('train', f)
    p = load_params(f)
    for model in ('yolov8n.yaml', 'fasterrcnn_mobilenet_v3_large_fpn'):
        run = RunDir(run_dir(p, model))
        tj, m = run.record, run.metrics
        assert tj['status'] == 'done' and tj['tiles']['parent'] == check_version(p0).manifest['version'], tj
        assert run.dir.parent.parent.name == tj['tiles']['version'] == tj['version']           # trained on the tiles, in them
        assert m['version'] == tj['tiles']['parent'] and 'windows of 128 px' in m['conventions']['inference']
        n_test = (check_version(p0).images.split == 'test').sum()
        pred = pd.read_csv(run.predictions('test'), dtype={'image_id': str})
        assert pred.image_id.nunique() <= n_test and set(pred.image_id) <= set(check_version(p0).images.image_id)   # whole images' ids
    # served and explained as it was scored: window by window, the maps stitched on the image
    from mammo_nb.explain import explain_run
    from mammo_nb.serve import Predictor
    P = Predictor(run_dir(p, 'yolov8n.yaml'))
    assert 'windows of 128 px' in P.ids['inference']
    V0 = check_version(p0)
    src = Path(p0.source.root) / V0.images[V0.images.role == 'positive'].path.iloc[0]
    png, res = P.explain(src)
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and res['boxes'] == P.predict(src)['boxes']
    ex = explain_run(p, run_dir(p, 'yolov8n.yaml'), progress=False)
    assert ex['lesions_scored'] > 0 and (run_dir(p, 'yolov8n.yaml') / 'explain' / 'lesions.csv').exists()
    q = load_params(tiny_recipe(tmp_path, p0.source.root, p0.prepare.out, name='noslice',
                                train={**TRAIN, 'epochs': 1, 'tiles': TILES, 'model': 'yolov8n.yaml'}))
    with pytest.raises(TrainError, match='evaluate.slices'): evaluate_run(q, run_dir(q, 'yolov8n.yaml'), progress=False)
