"""What real archives throw at `prepare`, on copies of the tiny set edited with pydicom: a study with several patient
IDs, an anonymiser that draws a new ID per image, garbage bits above BitsStored, a 1x2-pixel vendor test image, a
constant image, a For-Processing image, a zero window width, and a split that comes out empty. Every case ends in a
dataset version (or, under `strict`, a one-line error), each bad file with its reason, no traceback."""
import json, shutil, warnings

import numpy as np
import pandas as pd
import pydicom
import pytest

from conftest import mammo, tiny_recipe
from mammo_nb.ingest import IngestError, ingest
from mammo_nb.params import load_params
from mammo_nb.prepare import load_version, version_dir


def dicom(root, iid):
    b = pd.read_csv(root / 'breast-level_annotations.csv', dtype=str).set_index('image_id')
    return root / 'images' / b.study_id[iid] / f'{iid}.dicom'


@pytest.fixture(scope='module')
def messy(tiny_set, tmp_path_factory):
    "A copy of the tiny set with every defect below, prepared through the CLI; (root, version, CLI output, edits)."
    tmp = tmp_path_factory.mktemp('archive')
    root = tmp / 'raw'
    shutil.copytree(tiny_set, root)
    b = pd.read_csv(root / 'breast-level_annotations.csv', dtype=str)
    fa = pd.read_csv(root / 'finding_annotations.csv', dtype=str)
    plain = [i for i in b.image_id if not pydicom.dcmread(dicom(root, i), stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed]
    finding = set(fa[fa.finding_categories != "['No Finding']"].image_id)
    normal = [i for i in b.image_id if i not in finding and i != plain[0]]             # any transfer syntax
    studies = b.groupby('study_id').image_id.apply(list)
    e = {}
    # a study whose images carry two patient IDs (one mis-filed image), and one where every image has its own ID
    s1, s2 = studies.index[0], studies.index[1]
    ds = pydicom.dcmread(dicom(root, studies[s1][0])); ds.PatientID = 'MISFILED-0001'; ds.save_as(dicom(root, studies[s1][0]))
    for k, iid in enumerate(studies[s2]):
        ds = pydicom.dcmread(dicom(root, iid)); ds.PatientID = f'ANON-{k:04d}'; ds.save_as(dicom(root, iid))
    e['studies'] = (s1, s2)
    # garbage in the 4 bits above BitsStored = 12 on an uncompressed image
    e['garbage'] = plain[0]
    f = dicom(root, plain[0]); ds = pydicom.dcmread(f)
    assert ds.BitsStored == 12 and ds.BitsAllocated == 16
    e['clean_image'] = ingest(f).image
    a = ds.pixel_array.copy(); a[::3] |= 0xA000; ds.PixelData = a.tobytes(); ds.save_as(f)
    # a 1 x 2 pixel vendor test image, a constant image, a For-Processing image, a zero window width
    (t, c, fp, ww) = normal[:4]
    for iid, edit in ((t, 'tiny'), (c, 'constant'), (fp, 'for_processing'), (ww, 'window0')):
        f = dicom(root, iid); ds = pydicom.dcmread(f)
        if edit in ('tiny', 'constant'):                          # written uncompressed, whatever the file was
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            if edit == 'tiny': ds.Rows, ds.Columns = 1, 2
            ds.PixelData = np.full((ds.Rows, ds.Columns), 700, np.uint16).tobytes() if edit == 'constant' else \
                np.array([[100, 200]], np.uint16).tobytes()
        elif edit == 'for_processing': ds.PresentationIntentType = 'FOR PROCESSING'
        else: ds.WindowWidth = 0
        ds.save_as(f)
        e[edit] = iid
    f = tiny_recipe(tmp, root, tmp / 'versions', name='messy')
    with warnings.catch_warnings():
        warnings.simplefilter('error')                         # the zero window is no divide-by-zero warning
        ingest(dicom(root, ww))
    r = mammo('prepare', f, '--quiet')
    return root, load_version(version_dir(load_params(f))), r, e, f


def test_mixed_patient_ids_make_one_group_not_a_leak(messy):
    root, V, r, e, f = messy
    assert 'Traceback' not in r.stdout + r.stderr and 'LeakageError' not in r.stderr
    for s in e['studies']:
        assert V.images[V.images.study_id == s].split.nunique() == 1          # one study, one split
    g = V.manifest['grouping']
    assert g['merged_groups'] >= 1 and g['groups'] == V.manifest['counts']['groups_per_split']['train'] + \
        V.manifest['counts']['groups_per_split']['val'] + V.manifest['counts']['groups_per_split']['test']
    assert f"merged_groups: {g['merged_groups']}" in r.stdout                             # the summary says it


def test_garbage_high_bits_are_masked(messy):
    root, V, r, e, f = messy
    assert np.array_equal(ingest(dicom(root, e['garbage'])).image, e['clean_image'])       # as if the bits were 0
    assert e['garbage'] in set(V.images.image_id)


def test_non_mammograms_are_recorded_with_a_reason(messy, tmp_path):
    root, V, r, e, f = messy
    why = V.failures.set_index('image_id').reason
    assert (why.get(e['tiny']), why.get(e['constant']), why.get(e['for_processing'])) == ('too_small', 'blank_image', 'for_processing')
    assert e['window0'] in set(V.images.image_id)
    assert V.images.set_index('image_id').voi_source[e['window0']] == 'percentile'       # the zero window is ignored
    assert f"failures: {len(V.failures)}" in r.stdout and len(V.failures) == 3
    with pytest.raises(IngestError, match='for_processing'): ingest(dicom(root, e['for_processing']))
    assert ingest(dicom(root, e['for_processing']), for_processing_images='keep').image.shape[0] > 64
    k = tiny_recipe(tmp_path, root, tmp_path / 'v', name='keep', prepare={'for_processing': 'keep'})
    mammo('prepare', k, '--quiet')
    assert e['for_processing'] in set(load_version(version_dir(load_params(k))).images.image_id)


def test_an_empty_split_is_said_and_strict_fails(tiny_set, tmp_path):
    root = tmp_path / 'one'
    shutil.copytree(tiny_set, root)
    b = pd.read_csv(root / 'breast-level_annotations.csv', dtype=str)
    b['split'] = 'training'                                            # no official test split, and ...
    b.to_csv(root / 'breast-level_annotations.csv', index=False)
    for iid in b.image_id:                                             # ... one patient for every image
        ds = pydicom.dcmread(dicom(root, iid)); ds.PatientID = 'SAME'; ds.save_as(dicom(root, iid))
    r = mammo('prepare', tiny_recipe(tmp_path, root, tmp_path / 'v', name='one'), '--quiet')
    V = load_version(version_dir(load_params(tmp_path / 'one.yaml')))
    empty = [sp for sp in ('train', 'val', 'test') if not (V.images.split == sp).any()]
    assert len(empty) == 2 and V.manifest['warnings'] and all(f"WARNING: split '{sp}' is empty" in r.stdout for sp in empty)
    rs = mammo('prepare', tiny_recipe(tmp_path, root, tmp_path / 'vs', name='strict', strict=True), '--quiet', check=False)
    assert rs.returncode == 2 and 'is empty' in rs.stderr and '(strict)' in rs.stderr and 'Traceback' not in rs.stderr


def test_pseudonyms_are_keyed_and_paths_can_be_hashed(tiny_set, tmp_path):
    "Same key -> same pseudonyms; another key -> others (and a version refuses a second key); hashed paths leak no folder."
    runs = {}
    for name, key, extra in (('a', 'ka', {}), ('b', 'kb', {}), ('h', 'ka', {'paths': 'hashed'})):
        f = tiny_recipe(tmp_path, tiny_set, tmp_path / name / 'versions', name=name,
                        prepare={'pseudonym_key': str(tmp_path / key), **extra})
        mammo('prepare', f, '--quiet')
        runs[name] = (f, load_version(version_dir(load_params(f))))
    (fa, a), (fb, b), (fh, h) = runs['a'], runs['b'], runs['h']
    assert a.images.patient.notna().all() and not set(a.images.patient) & set(b.images.patient)
    assert list(h.images.patient) == list(a.images.patient)                    # same key, same pseudonyms
    assert a.manifest['pseudonym_key_fingerprint'] != b.manifest['pseudonym_key_fingerprint']
    split = lambda V: V.images.set_index('image_id').split.sort_index()
    assert split(a).equals(split(b))                                           # the split does not depend on the key
    assert (tmp_path / 'ka').read_text().strip() not in json.dumps(a.manifest)  # the key itself is nowhere
    raw = set(a.images.path)
    assert all('/' in x for x in raw) and not raw & set(h.images.path) and not any('/' in x for x in h.images.path)
    assert not any(x in (h.dir / 'images.csv').read_text() for x in raw)
    # the version built under key a, now asked to go on with key b: stopped, with what to do
    (tmp_path / 'ka').write_text((tmp_path / 'kb').read_text())
    r = mammo('prepare', fa, '--quiet', check=False)
    assert r.returncode == 2 and 'another pseudonym key' in r.stderr and 'Traceback' not in r.stderr
