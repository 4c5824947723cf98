"""The synthetic VinDr-layout set as a user gets it from `mammo synth`: real DICOM, exact CSV columns, boxes on findings."""
import ast
import numpy as np
import pandas as pd
import pydicom
import pytest

from conftest import cli, mammo
from mammo_nb.synth import BREAST_COLUMNS, FINDING_CLASSES, FINDING_COLUMNS, example_job, synth_dataset, synth_image

VINDR_FINDING = ['study_id', 'series_id', 'image_id', 'laterality', 'view_position', 'height', 'width', 'breast_birads',
                 'breast_density', 'finding_categories', 'finding_birads', 'xmin', 'ymin', 'xmax', 'ymax', 'split']


def test_layout_and_columns(tiny_set):
    assert FINDING_COLUMNS == VINDR_FINDING
    f = pd.read_csv(tiny_set / 'finding_annotations.csv')
    b = pd.read_csv(tiny_set / 'breast-level_annotations.csv')
    assert list(f.columns) == VINDR_FINDING
    assert list(b.columns) == BREAST_COLUMNS
    assert list(pd.read_csv(tiny_set / 'spiculation_annotations.csv').columns) == VINDR_FINDING
    assert set(f.split) == {'training', 'test'} and set(b.split) == {'training', 'test'}
    assert b.breast_birads.str.fullmatch(r'BI-RADS [1-5]').all()
    assert b.breast_density.str.fullmatch(r'DENSITY [A-D]').all()
    # every image has 4 views per study and a file at images/{study_id}/{image_id}.dicom
    assert (b.groupby('study_id').size() == 4).all()
    for r in b.itertuples():
        assert (tiny_set / 'images' / r.study_id / f'{r.image_id}.dicom').is_file()
    # No Finding rows carry a NaN box; finding_categories is a stringified list
    cats = f.finding_categories.map(ast.literal_eval)
    nf = cats.map(lambda c: c == ['No Finding'])
    assert nf.any() and f.loc[nf, ['xmin', 'ymin', 'xmax', 'ymax']].isna().all().all()
    assert f.loc[nf, 'finding_birads'].isna().all()


def test_dicoms_are_real_and_varied(tiny_set):
    files = sorted((tiny_set / 'images').rglob('*.dicom'))
    assert len(files) == 24
    seen = []
    for p in files:
        ds = pydicom.dcmread(p)
        a = ds.pixel_array
        assert ds.Modality == 'MG' and a.dtype == np.uint16 and a.shape == (ds.Rows, ds.Columns)
        assert ds.BitsAllocated == 16 and ds.BitsStored in (12, 14) and a.max() < 2 ** ds.BitsStored
        assert ds.ImageLaterality in 'LR' and ds.ViewPosition in ('CC', 'MLO') and len(ds.PixelSpacing) == 2
        assert str(ds.PatientName) and ds.PatientID and ds.PatientBirthDate   # synthetic PHI is there, to be stripped later
        seen.append((ds.file_meta.TransferSyntaxUID.name, ds.PhotometricInterpretation,
                     'multi' if 'WindowCenter' in ds and ds['WindowCenter'].VM > 1 else
                     'lut' if 'VOILUTSequence' in ds else 'window' if 'WindowCenter' in ds else 'none'))
    ts, pi, voi = map(set, zip(*seen))
    assert {'JPEG 2000 Image Compression (Lossless Only)', 'JPEG-LS Lossless Image Compression', 'Explicit VR Little Endian'} <= ts
    assert {'MONOCHROME1', 'MONOCHROME2'} == pi
    assert {'multi', 'lut', 'window', 'none'} == voi


def test_monochrome1_breast_is_dark_as_stored(tiny_set):
    truth = pd.read_csv(tiny_set / 'synth_truth.csv').drop_duplicates('image_id')
    for r in truth[truth.photometric == 'MONOCHROME1'].itertuples():
        ds = pydicom.dcmread(tiny_set / r.path)
        a = ds.pixel_array.astype(float)
        chest = a[:, :a.shape[1] // 6] if r.laterality == 'L' else a[:, -a.shape[1] // 6:]
        far = a[-10:, -10:] if r.laterality == 'L' else a[-10:, :10]
        assert far.mean() > chest.mean(), 'air is stored brighter than breast in MONOCHROME1'


def test_boxes_contain_truth_and_patients_group(tiny_set):
    f = pd.read_csv(tiny_set / 'finding_annotations.csv')
    t = pd.read_csv(tiny_set / 'synth_truth.csv')
    boxed = t[t.txmin.notna() & ~t.unboxed]
    assert len(boxed) > 0
    ann = f.dropna(subset=['xmin'])
    for r in boxed.itertuples():          # each tight (truth) box lies inside an annotated box of its image
        a = ann[ann.image_id == r.image_id]
        assert ((a.xmin <= r.txmin) & (a.ymin <= r.tymin) & (a.xmax >= r.txmax) & (a.ymax >= r.tymax)).any()
    # boxes leave the image only by a few mm, as in VinDr
    assert (ann.xmin > -10).all() and (ann.xmax < ann.width + 10).all()
    per_patient = t.groupby('patient_key').agg(studies=('study_id', 'nunique'), splits=('split', 'nunique'))
    assert (per_patient.studies > 1).any(), 'some patient has two studies'
    assert (per_patient.splits == 1).all(), 'a patient is in one official split'


def test_no_header_phi_in_csvs(tiny_set):
    text = ''.join(p.read_text() for p in tiny_set.glob('*.csv'))
    for p in list((tiny_set / 'images').rglob('*.dicom'))[:8]:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        for v in (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate):
            assert v not in text


def test_every_class_and_annotation_quirk(tmp_path):
    "A larger low-resolution set has every class, multi-label boxes, unboxed findings and the Spiculation layer."
    r = synth_dataset(tmp_path / 's', 'tiny', seed=3, n_patients=40, height=256, finding_rate=1.0, progress=False)
    f = r['findings']
    cats = f.finding_categories.map(ast.literal_eval)
    assert set(FINDING_CLASSES) <= set(c for cs in cats for c in cs)
    assert cats.map(len).max() >= 2, 'multi-label boxes exist'
    assert (f.xmin.isna() & cats.map(lambda c: c != ['No Finding'])).any(), 'findings without a box exist'
    assert (f.xmin < 0).any() or (f.ymin < 0).any(), 'some boxes leave the image'
    lymph = f[cats.map(lambda c: 'Suspicious Lymph Node' in c)]
    assert set(lymph.view_position) == {'MLO'}
    s = r['spiculation']
    assert len(s) > 0
    boxes = f.dropna(subset=['xmin'])
    for x in s.itertuples():              # each Spiculation box (mass + spicules) holds a smaller Mass box of its image
        m = boxes[(boxes.image_id == x.image_id) & boxes.finding_categories.str.contains('Mass')]
        inside = (m.xmin >= x.xmin) & (m.ymin >= x.ymin) & (m.xmax <= x.xmax) & (m.ymax <= x.ymax)
        smaller = (m.xmax - m.xmin) * (m.ymax - m.ymin) < (x.xmax - x.xmin) * (x.ymax - x.ymin)
        assert (inside & smaller).any()


def test_full_preset_geometry():
    img, rows = synth_image(example_job(['Mass'], preset='full', seed=1))
    assert img.shape == (4084, 3328) and len(rows) == 1


def test_cli_errors(tmp_path):
    r = cli('synth', '--preset', 'huge', '--out', tmp_path / 'x')
    assert r.returncode == 2 and "invalid choice: 'huge'" in r.stderr
    bad = tmp_path / 'bad.yaml'
    bad.write_text('name: bad\nsynth: {preset: tiny, sed: 1, workers: two}\n')
    r = cli('run', bad)
    assert r.returncode == 2
    assert str(bad) in r.stderr and "unknown key 'synth.sed'" in r.stderr and "'synth.workers' must be int" in r.stderr


def test_default_recipe_builds_what_it_needs(tmp_path, capsys):
    """A new user's first command on a recipe without `source.root`: a stage that needs the dataset version builds it,
    and `prepare` (which `mammo prepare` runs) writes the embedded synthetic set first, each saying so in one line,
    instead of stopping."""
    import yaml
    from conftest import ROOT
    from mammo_nb.params import load_params
    from mammo_nb.trainutil import check_version
    f = tmp_path / 'r.yaml'
    f.write_text(yaml.safe_dump({'base': str(ROOT / 'params' / 'tiny.yaml'), 'name': 'fresh',
                                 'synth': {'out': str(tmp_path / 'raw')}, 'prepare': {'out': str(tmp_path / 'versions'), 'workers': 1}}))
    p = load_params(f)
    V = check_version(p)                         # train, evaluate, explain, ... start here: synth set and version built
    err = capsys.readouterr().err
    assert 'not built yet: building it first' in err and 'embedded synthetic set (tiny preset, vindr layout) is written first' in err
    n = len(pd.read_csv(tmp_path / 'raw' / 'breast-level_annotations.csv'))
    assert (tmp_path / 'raw' / 'synth_info.json').exists() and len(V.images) == n
    r = cli('prepare', f, '--quiet')             # `mammo prepare` goes through the same prepare(): here nothing is left to build
    assert r.returncode == 0 and f'images: {n}\n' in r.stdout and 'written first' not in r.stderr, r.stderr
    # a real dataset's missing root is an error naming what is missing, not a build
    f.write_text(yaml.safe_dump({**yaml.safe_load(f.read_text()), 'source': {'root': str(tmp_path / 'nowhere')}}))
    r = cli('prepare', f, '--quiet')
    assert r.returncode == 2 and 'nowhere' in r.stderr and 'not found' in r.stderr


def test_every_hinted_command_exists():
    "Each `mammo COMMAND` an error message or docstring of the package names is a command the CLI has (its --help runs)."
    import re
    from conftest import ROOT
    from mammo_nb.cli import parser
    cmds = set(parser()._subparsers._group_actions[0].choices)
    hinted = {m for f in (ROOT / 'mammo_nb').glob('*.py') for m in re.findall(r'`mammo ([a-z]+)', f.read_text())}
    assert hinted and hinted <= cmds, hinted - cmds
    for c in sorted(hinted):
        r = cli(c, '--help')
        assert r.returncode == 0 and f'mammo {c}' in r.stdout, (c, r.stderr)
