"""Each dataset layout as a user meets it: synthetic data written in that layout -> `mammo prepare --dry-run` ->
`mammo prepare` -> a dataset version whose boxes lie on the generator's lesions, split by patient, with the
image-level labels kept and no in-house identifier in any output."""
import json, re, shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import layout_recipe as recipe, layout_version, mammo
from mammo_nb.annotations import pick_class
from mammo_nb.clahe import to_output
from mammo_nb.params import load_params
from mammo_nb.prepare import load_version, version_dir
from mammo_nb.synth_layouts import read_truth

LAYOUTS = ('cbis', 'rsna', 'mias', 'csv', 'inbreast')


def parse(out: str) -> dict:
    "The `key: value` lines that `mammo prepare --dry-run` prints."
    return {m[1]: m[2] for m in re.finditer(r'^(\w+): (.*)$', out, re.M)}


@pytest.fixture(scope='module', params=LAYOUTS)
def built(request, tmp_path_factory):
    "The layout's synthetic set, its dry run and its version: built once per session (test_external reuses them)."
    layout = request.param
    tmp, f, dry, r = layout_version(tmp_path_factory, layout)
    return layout, tmp, f, dry, r, load_version(version_dir(load_params(f))), read_truth(tmp / 'raw')


def _image_ids(V, truth: pd.DataFrame) -> pd.Series:
    "The version's image id of each truth row (CSV truth knows only the file)."
    by_path = V.images.set_index('path').image_id
    return truth.image_id.where(truth.image_id.notna(), truth.path.map(by_path)).astype(str)


def test_dry_run_counts(built):
    layout, tmp, f, dry, r, V, truth = built
    d = parse(dry)
    n_images = _image_ids(V, truth).nunique()
    assert int(d['images']) == n_images == V.manifest['counts']['images']
    assert int(d['patients']) == truth.patient_key.nunique()
    assert int(d['problems']) == 0 and int(d['missing_files']) == 0
    rows = eval(d['annotation_rows'])
    assert sum(rows.values()) >= n_images
    print(layout, {k: d[k] for k in ('annotation_rows', 'patients', 'studies', 'images', 'boxes', 'roles')})


def test_boxes_on_lesions(built):
    layout, tmp, f, dry, r, V, truth = built
    assert V.manifest['failures']['total'] == 0, V.failures
    if layout == 'rsna':
        assert len(V.boxes) == 0
        return
    classes = V.manifest['classes']
    t = truth[truth.txmin.notna() & ~truth.unboxed.astype(bool)].assign(image_id=lambda x: _image_ids(V, x))
    assert len(t) >= 5
    geo = V.images.set_index('image_id')
    ious = []
    for r_ in t.itertuples():
        tb = to_output([r_.txmin, r_.tymin, r_.txmax, r_.tymax], geo.crop[r_.image_id], geo.scale[r_.image_id])[0]
        cls = pick_class([c for c in r_.categories if c != 'Spiculation'] or ['Spiculation'], classes, classes)
        if cls is None:                                   # an ignored class (INbreast's isolated calcifications): image-level
            assert set(r_.categories) <= set(geo.labels[r_.image_id]), r_; continue
        b = V.boxes[(V.boxes.image_id == r_.image_id) & (V.boxes.cls == cls)]
        inside = (b.x0 <= tb[0] + 1.5) & (b.y0 <= tb[1] + 1.5) & (b.x1 >= tb[2] - 1.5) & (b.y1 >= tb[3] - 1.5)
        ix = (np.clip(np.minimum(b.x1, tb[2]) - np.maximum(b.x0, tb[0]), 0, None)
              * np.clip(np.minimum(b.y1, tb[3]) - np.maximum(b.y0, tb[1]), 0, None))
        iou = ix / ((b.x1 - b.x0) * (b.y1 - b.y0) + (tb[2] - tb[0]) * (tb[3] - tb[1]) - ix)
        ious.append(float(iou.max()) if len(b) else 0.0)
        # CBIS-DDSM boxes come from the mask (the lesion itself): they match it; the others are annotators' boxes around it
        assert (iou.max() >= 0.75) if layout == 'cbis' else inside.any(), (layout, r_.image_id, cls, tb, b)
    print(layout, f'{len(t)} lesions, IoU with truth min {min(ious):.2f} median {np.median(ious):.2f}')
    if any('Spiculation' in c for c in t.categories): assert (V.boxes.layer == 'spiculation').any()


def test_patients_and_image_level_labels(built):
    layout, tmp, f, dry, r, V, truth = built
    im = V.images.assign(pk=V.images.image_id.map(truth.assign(image_id=_image_ids(V, truth)).drop_duplicates('image_id')
                                                   .set_index('image_id').patient_key))
    assert im.pk.notna().all()
    assert im.groupby('pk').split.nunique().max() == 1                       # a patient never spans two splits
    assert im.groupby('pk').patient.nunique().max() == 1 and im.groupby('patient').pk.nunique().max() == 1
    roles = im.set_index('image_id').role
    if layout == 'rsna':
        c = im.image_id.map(truth.set_index('image_id').cancer)
        assert (roles[im.image_id[c == 1]] == 'image_level').all() and (roles[im.image_id[c == 0]] == 'negative').all()
        assert (im.labels[c == 1].map(tuple) == pd.Series([('Cancer',)] * int((c == 1).sum()), index=im.index[c == 1])).all() and (im.pathology[c == 1] == 'malignant').all()
        assert (c == 1).any() and (c == 0).any()
    else:
        un = truth[truth.unboxed.astype(bool)].assign(image_id=lambda x: _image_ids(V, x))
        if layout in ('mias', 'csv'): assert len(un), 'the generator wrote image-level-only findings'
        labels = im.set_index('image_id').labels
        for r_ in un.itertuples(): assert set(r_.categories) <= set(labels[r_.image_id]), r_
        assert (roles == 'positive').any()
    if layout == 'cbis': assert (im.role != 'negative').all()                 # CBIS-DDSM has no normal images


def test_no_identifier_in_outputs(built):
    layout, tmp, f, dry, r, V, truth = built
    if layout != 'csv': pytest.skip('the generic CSV is the layout with in-house ids')
    a = pd.read_csv(tmp / 'raw' / 'annotations.csv', dtype=str)
    ids = set(a.patient_id) | set(a.study_id)
    text = ''.join(p.read_text(errors='ignore') for p in V.dir.rglob('*') if p.is_file() and p.suffix in ('.csv', '.json', '.yaml', '.txt'))
    leaked = sorted(i for i in ids if i in text.replace(str(tmp), ''))
    # only the file paths the user chose (images/<MRN>/...) carry them, in images.csv `path`; ids never do
    assert not [i for i in leaked if i.startswith('ACC')], leaked
    for col in ('image_id', 'study_id', 'patient'): assert not V.images[col].astype(str).str.contains('MRN|ACC').any()


def test_missing_files_listed_and_survived(built, tmp_path):
    """A download with a file missing: `--dry-run` lists it (exit 1, no crash) and `prepare` records it and goes on."""
    layout, tmp, f, dry, r, V, truth = built
    root = tmp_path / 'copy'
    shutil.copytree(tmp / 'raw', root)
    rel = V.images.path.iloc[len(V.images) // 2]              # an image file the annotations name
    (root / rel).unlink()
    g = recipe(tmp_path, layout, root, 'missing')
    d = mammo('prepare', g, '--dry-run', check=False)
    assert d.returncode == 1, d.stdout + d.stderr
    # INbreast finds its files by file id: a missing one is named by the pattern it was looked for under
    named = f"AllDICOMs/{Path(rel).name.split('_')[0]}_*.dcm" if layout == 'inbreast' else rel
    assert 'missing_files: 1' in d.stdout and named in d.stdout, d.stdout
    p = mammo('prepare', g, '--quiet')
    assert 'failures: 1' in p.stdout, p.stdout
    W = load_version(version_dir(load_params(g)))
    assert W.failures.reason.tolist() == ['missing_file']
    assert W.manifest['counts']['images'] >= V.manifest['counts']['images'] - 1


def test_partner_views(built):
    """Every layout's version names each image's breast and partners: the contralateral is the same view family of the
    other breast, the ipsilateral the other view family of the same breast, both in its study and of its patient;
    every image that has such an image beside it gets one; mini-MIAS (right and left MLO of one woman) gets exactly
    mdb(2k+1) <-> mdb(2k+2) and no ipsilateral."""
    from mammo_nb.split import VIEW_FAMILY
    layout, tmp, f, dry, r, V, truth = built
    im = V.images.assign(fam=V.images.view.astype(str).str.upper().map(VIEW_FAMILY),
                         lat=V.images.laterality.astype(str).str.upper().str[:1]).set_index('image_id')
    has = lambda x: isinstance(x, str) and x != ''
    n = dict(contralateral=0, ipsilateral=0)
    for i, a in im.iterrows():
        same = im[(im.study_id == a.study_id) & (im.patient == a.patient) & (im.index != i)]
        want = dict(contralateral=same[(same.lat == {'L': 'R', 'R': 'L'}.get(a.lat)) & (same.fam == a.fam)],
                    ipsilateral=same[(same.lat == a.lat) & same.fam.notna() & (same.fam != a.fam)])
        for kind, cand in want.items():
            ok = a.lat in ('L', 'R') and isinstance(a.fam, str)
            assert has(a[kind]) == (ok and len(cand) > 0), (layout, i, kind, a[kind], list(cand.index))
            if has(a[kind]): assert a[kind] in cand.index; n[kind] += 1
        assert a.breast == (f'{a.patient}/{a.lat}' if a.lat in ('L', 'R') else a.breast)
    assert V.manifest['views']['with_contralateral'] == n['contralateral'] and V.manifest['views']['with_ipsilateral'] == n['ipsilateral']
    if layout == 'mias':
        k = im.index.str[3:].astype(int)
        assert (im.contralateral == [f'mdb{j + 1 if j % 2 else j - 1:03d}' for j in k]).all() and n['ipsilateral'] == 0
    else: assert n['contralateral'] > 0 and n['ipsilateral'] > 0, (layout, n)
    print(layout, V.manifest['views'])
