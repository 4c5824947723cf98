"""Real mammograms: the development half of mini-MIAS (`../shared/data/mias-dev`, 162 scanned-film MLO images of 81
women, research licence: read from there, never copied here). The whole `params/mias-dev.yaml` version is built (about
3 s) and checked against `Info.txt`, read here independently of the adapter: every image ingested, every circle a box
at the right place and size after the breast crop and the resize, each woman's two breasts in one split, the crop
keeping every lesion and dropping the film's empty background, and the copy-paste bank cut from these images."""
import ast, re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEV = (ROOT / '../shared/data/mias-dev').resolve()
pytestmark = pytest.mark.skipif(not (DEV / 'Info.txt').is_file(),
                                reason=f'the real mini-MIAS development half is not at {DEV} (it lives outside the repository)')
CLASSES = {'CIRC': ['Mass'], 'MISC': ['Mass'], 'SPIC': ['Mass', 'Spiculation'], 'CALC': ['Suspicious Calcification'],
           'ARCH': ['Architectural Distortion'], 'ASYM': ['Asymmetry']}


def lit(v):
    "A list column of the version's tables, as read (a list) or as written (its text)."
    return ast.literal_eval(v) if isinstance(v, str) else v


def info_rows() -> pd.DataFrame:
    "Info.txt's rows (ref, bg, class, severity, x, y, radius), read with a regular expression of its own."
    rows = []
    for line in (DEV / 'Info.txt').read_text(errors='replace').splitlines():
        f = line.split()
        if len(f) >= 3 and re.fullmatch(r'mdb\d{3}', f[0]) and f[2] in CLASSES.keys() | {'NORM'}:
            rows.append((f + [None] * 7)[:7])
    t = pd.DataFrame(rows, columns=['ref', 'bg', 'cls', 'sev', 'x', 'y', 'r'])
    for c in ('x', 'y', 'r'): t[c] = pd.to_numeric(t[c], errors='coerce')     # '*NOTE 3*': a calcification without a centre
    return t


@pytest.fixture(scope='module')
def version(tmp_path_factory):
    from mammo_nb.params import load_params
    from mammo_nb.prepare import prepare, load_version
    out = tmp_path_factory.mktemp('mias-dev')
    p = load_params(ROOT / 'params/mias-dev.yaml', {'source': {'root': str(DEV)},
                                                   'prepare': {'out': str(out / 'versions'), 'pseudonym_key': str(out / 'key')}})
    s = prepare(p, progress=False)
    return s, load_version(p)


def test_every_image_ingested(version):
    s, V = version
    t = info_rows()
    assert s['failures'] == 0 and s['images'] == 162 == t.ref.nunique() == len(list(DEV.glob('mdb*.pgm')))
    assert set(V.images.image_id) == set(t.ref)
    assert (V.images['rows'] == 1024).all() and (V.images['cols'] == 1024).all()


def test_circles_become_boxes(version):
    """Each circle of Info.txt (origin bottom-left) is a box of side 2r around (x, 1024 - y), cut to the breast crop
    (a loose circle can reach past the breast) and scaled to the PNG."""
    _, V = version
    t = info_rows().dropna(subset=['x'])
    assert len(t) >= 40                                      # 29 masses, calcifications with a centre, distortions...
    im = V.images.set_index('image_id')
    n = 0
    for r in t.itertuples():
        (X0, Y0, X1, Y1), (sx, sy) = lit(im.crop[r.ref]), lit(im.scale[r.ref])
        y = 1024 - r.y
        want = np.array([(max(r.x - r.r, X0) - X0) * sx, (max(y - r.r, Y0) - Y0) * sy,
                         (min(r.x + r.r, X1) - X0) * sx, (min(y + r.r, Y1) - Y0) * sy])
        for c in CLASSES[r.cls]:
            b = V.boxes[(V.boxes.image_id == r.ref) & (V.boxes.cls == c)][['x0', 'y0', 'x1', 'y1']].to_numpy()
            assert len(b), (r.ref, c)
            assert np.abs(b - want).max(1).min() < 1.0, (r.ref, c, b, want)
            n += 1
    assert n >= 40
    assert (V.boxes.cls == 'Mass').sum() == t.cls.isin(['CIRC', 'MISC', 'SPIC']).sum()


def test_breast_crop_and_clahe(version):
    "The breast crop keeps every lesion centre and drops the film's empty background; the PNGs are CLAHE'd at 640 px."
    _, V = version
    t = info_rows().dropna(subset=['x'])
    im = V.images.set_index('image_id')
    for r in t.itertuples():
        x0, y0, x1, y1 = lit(im.crop[r.ref])
        assert x0 <= r.x <= x1 and y0 <= 1024 - r.y <= y1, r.ref
    area = np.array([(c[2] - c[0]) * (c[3] - c[1]) for c in map(lit, im.crop)]) / 1024 ** 2
    assert np.median(area) < 0.75                             # MIAS films carry wide empty margins beside the breast
    for ref in im.index[:6]:
        png = cv2.imread(str(V.dir / im.png[ref]), cv2.IMREAD_UNCHANGED)
        assert png.dtype == np.uint8 and max(png.shape) == 640 and list(png.shape[::-1]) == lit(im['size'][ref])
        raw = cv2.imread(str(DEV / f'{ref}.pgm'), cv2.IMREAD_UNCHANGED)
        x0, y0, x1, y1 = lit(im.crop[ref])
        crop = cv2.resize(raw[y0:y1, x0:x1], png.shape[::-1], interpolation=cv2.INTER_AREA)
        inside = crop > 20
        detail = lambda a: np.abs(a.astype(np.float32) - cv2.blur(a, (15, 15)).astype(np.float32))[inside].mean()
        assert detail(png) > 1.2 * detail(crop)                   # CLAHE: local contrast raised inside the breast


def test_pairs_share_a_split(version):
    "mdb(2k+1) and mdb(2k+2) are one woman: one patient pseudonym, one split, each the other's contralateral partner."
    _, V = version
    im = V.images.assign(k=V.images.image_id.str[3:].astype(int))
    g = im.groupby((im.k + 1) // 2)
    assert (g.patient.nunique() == 1).all() and (g.split.nunique() == 1).all() and len(g) == 81
    partner = im.set_index('image_id').contralateral                  # each breast read beside the other one
    assert all(partner[f'mdb{k:03d}'] == f'mdb{k + 1 if k % 2 else k - 1:03d}' for k in im.k)
    assert V.manifest['views']['with_contralateral'] == 162 and V.manifest['views']['with_ipsilateral'] == 0


def test_copy_paste_bank_from_real_lesions(version):
    "Real masses cut from one woman's image and pasted into another's breast, inside it and off the pectoral corner."
    from mammo_nb.paste import lesion_crops, paste_lesions, breast_region
    _, V = version
    im = V.images.set_index('image_id')
    m = V.boxes[V.boxes.cls == 'Mass']
    a = m.image_id.iloc[0]
    dst = next(i for i in im.index if i not in set(m.image_id) and list(lit(im.labels[i])) == ['No Finding'])   # a normal breast
    rd = lambda i: cv2.imread(str(V.dir / im.png[i]))
    B = m[m.image_id == a]
    bank = [dict(e, source=a) for e in lesion_crops(rd(a), B[['x0', 'y0', 'x1', 'y1']].to_numpy(), B.class_id.to_numpy())]
    img = rd(dst)
    hits = 0
    for seed in range(5):
        out, b, c = paste_lesions(img, np.zeros((0, 4)), bank, np.random.default_rng(seed), n=1, scale=0.1, source=dst)
        for x0, y0, x1, y1 in b:
            hits += 1
            mask = breast_region(img)
            assert mask[int((y0 + y1) / 2), int((x0 + x1) / 2)]
            assert (out != img).any() and (out[:, :, 0] == out[:, :, 1]).all()
    assert hits >= 3
