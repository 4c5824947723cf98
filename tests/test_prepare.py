"""`mammo prepare` as a user runs it: versions, rerun/resume identity, shards, bad input, no PHI, no leakage."""
import json, shutil, signal, subprocess, time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from conftest import BIN, cli, mammo
from mammo_nb.clahe import to_output
from mammo_nb.params import load_params
from mammo_nb.prepare import load_version, prepare, version_dir


def recipe(tmp, root, out, **extra):
    "A recipe file based on tiny.yaml, reading `root` and writing versions under `out`."
    d = {'base': str(Path(__file__).resolve().parents[1] / 'params' / 'tiny.yaml'), 'name': 't',
         'source': {'root': str(root)}, 'prepare': {'out': str(out), 'workers': 1}, **extra}
    f = tmp / f'recipe-{len(list(tmp.glob("recipe-*")))}.yaml'
    f.write_text(yaml.safe_dump(d))
    return f


def vdir(f): return version_dir(load_params(f))


@pytest.fixture(scope='module')
def built(tiny_set, tmp_path_factory):
    "The tiny set prepared once through the CLI."
    tmp = tmp_path_factory.mktemp('prep')
    f = recipe(tmp, tiny_set, tmp / 'versions')
    r = mammo('prepare', f, '--quiet')
    return f, vdir(f), r


def test_version_layout_and_ultralytics_files(built):
    f, d, r = built
    assert 'failures: 0' in r.stdout
    for name in ('manifest.json', 'data.yaml', 'images.csv', 'boxes.csv', 'failures.csv', 'train.txt', 'val.txt',
                 'test.txt', 'annotations/train.json'):
        assert (d / name).is_file(), name
    data = yaml.safe_load((d / 'data.yaml').read_text())
    assert data['names'][0] == 'Mass' and data['nc'] == len(data['names'])
    m = json.loads((d / 'manifest.json').read_text())
    listed = [x for sp in ('train', 'val', 'test') for x in (d / f'{sp}.txt').read_text().split()]
    for x in listed:                                       # every listed image and its label file exist and are hashed
        png = x.removeprefix('./')
        lab = png.replace('images/', 'labels/', 1).replace('.png', '.txt')
        assert (d / png).is_file() and (d / lab).is_file() and png in m['files'] and lab in m['files']
    # the manifest's hashes are the files' hashes
    import hashlib
    for rel, sha in list(m['files'].items())[:50]:
        assert hashlib.sha256((d / rel).read_bytes()).hexdigest() == sha, rel
    assert m['counts']['images'] == 24 and m['failures']['total'] == 0
    assert m['clahe']['long_side'] == 256 and m['split']['seed'] == 0 and 'negative_sampling_seed' in m
    assert m['code']['version'] and m['version'] == d.name


def test_rerun_is_identical_and_skips(built):
    f, d, _ = built
    before = (d / 'manifest.json').read_bytes()
    r = mammo('prepare', f, '--quiet')
    assert "'ingested': 0, 'skipped': 24" in r.stdout
    assert (d / 'manifest.json').read_bytes() == before


def test_changed_param_makes_new_version(built, tmp_path):
    f, d, _ = built
    p = load_params(f, {'clahe': {'clip_limit': 3.0}})
    assert version_dir(p) != d and version_dir(load_params(f, {'prepare': {'workers': 2}})) == d


def test_boxes_on_lesions_mono1_bright_no_leakage(built, tiny_set):
    f, d, _ = built
    V = load_version(d)
    truth = pd.read_csv(tiny_set / 'synth_truth.csv', dtype={'image_id': str})
    t = truth[truth.txmin.notna() & ~truth.unboxed.astype(bool)].merge(V.images[['image_id', 'crop', 'scale', 'size']], on='image_id')
    assert len(t) > 5
    for r in t.itertuples():                            # mapped truth lies inside a dataset box of that image
        tb = to_output([r.txmin, r.tymin, r.txmax, r.tymax], r.crop, r.scale)[0]
        b = V.boxes[V.boxes.image_id == r.image_id]
        assert ((b.x0 <= tb[0] + 1) & (b.y0 <= tb[1] + 1) & (b.x1 >= tb[2] - 1) & (b.y1 >= tb[3] - 1)).any(), r.image_id
    mono1 = V.images[V.images.photometricinterpretation == 'MONOCHROME1']
    assert len(mono1) >= 4
    for r in mono1.itertuples():
        im = cv2.imread(str(d / r.png), cv2.IMREAD_UNCHANGED)
        assert im.shape[::-1] == tuple(r.size) and im[im > 0].mean() > 60 and (im == 0).mean() > 0.05
    pk = V.images.image_id.map(truth.drop_duplicates('image_id').set_index('image_id').patient_key)
    assert pd.DataFrame(dict(k=pk, s=V.images.split)).groupby('k').s.nunique().max() == 1
    assert set(V.images.split) == {'train', 'val', 'test'}
    assert V.images.patient.notna().all()               # grouped by the header's patient, as a pseudonym


def test_no_header_phi_in_any_output(built, tiny_set):
    f, d, _ = built
    phi = set()
    for p in (tiny_set / 'images').rglob('*.dicom'):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        phi |= {str(ds.PatientName), str(ds.PatientName).replace('^', ' '), ds.PatientID, ds.PatientBirthDate,
                ds.AccessionNumber, ds.InstitutionName, str(ds.ReferringPhysicianName)}
    phi = {s for s in phi if len(s) >= 4}
    assert len(phi) > 10
    files = [p for p in d.rglob('*') if p.is_file()]
    assert len(files) > 40
    for p in files:
        data = p.read_bytes()
        for s in phi: assert s.encode() not in data, (p.name, s)


def test_shards_merge_to_the_same_version(built, tmp_path):
    f, d, _ = built
    f2 = recipe(tmp_path, load_params(f).source.root, tmp_path / 'v')     # same key file: same pseudonyms
    from mammo_nb.prepare import key_path
    (tmp_path / 'pseudonym.key').write_text(key_path(load_params(f)).read_text())
    d2 = vdir(f2)
    mammo('prepare', f2, '--shard', '0/3', '--quiet')
    r = cli('prepare', f2, '--merge')
    assert r.returncode == 2 and 'not ingested yet' in r.stderr
    mammo('prepare', f2, '--shard', '1/3', '--quiet'); mammo('prepare', f2, '--shard', '2/3', '--quiet')
    mammo('prepare', f2, '--merge')
    assert len(list((d2 / '_work').glob('records-*of3.jsonl'))) == 3
    a, b = (json.loads((x / 'manifest.json').read_text()) for x in (d, d2))
    assert a['files'] == b['files'] and a['counts'] == b['counts']
    assert cli('prepare', f2, '--shard', '3/3').returncode == 2


def test_killed_run_resumes_to_identical_manifest(tmp_path):
    raw = tmp_path / 'raw'
    mammo('synth', '--preset', 'tiny', '--out', raw, '--quiet')    # 24 images; the kill lands after a few
    f = recipe(tmp_path, raw, tmp_path / 'v', clahe={'long_side': 1024})
    d = vdir(f)
    proc = subprocess.Popen([str(BIN / 'mammo'), 'prepare', str(f), '--quiet'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = d / '_work' / 'records-0of1.jsonl'
    t0 = time.time()
    while time.time() - t0 < 60 and not (journal.exists() and len(journal.read_text().splitlines()) >= 3): time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); proc.wait()
    n_before = len(journal.read_text().splitlines())
    assert 3 <= n_before < 24 and not (d / 'manifest.json').exists()
    r = mammo('prepare', f, '--quiet')
    assert f"'skipped': {n_before}" in r.stdout
    resumed = (d / 'manifest.json').read_bytes()
    shutil.rmtree(d)
    mammo('prepare', f, '--quiet')
    assert (d / 'manifest.json').read_bytes() == resumed


def test_bad_input_recorded_run_continues_strict_fails(tiny_set, tmp_path):
    bad = tmp_path / 'bad'
    shutil.copytree(tiny_set, bad)
    b = pd.read_csv(bad / 'breast-level_annotations.csv', dtype=str)
    ts = [pydicom.dcmread(bad / 'images' / s / f'{i}.dicom', stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed
          for s, i in zip(b.study_id, b.image_id)]
    b = pd.concat([b[~pd.Series(ts)].iloc[:3], b[pd.Series(ts)].iloc[:2]])   # 3 uncompressed, then 2 compressed files
    paths = [bad / 'images' / s / f'{i}.dicom' for s, i in zip(b.study_id, b.image_id)]
    raw = paths[0].read_bytes(); paths[0].write_bytes(raw[:len(raw) // 3])              # truncated
    paths[1].write_bytes(b'\0' * 128 + b'DICM' + b'garbage' * 10)                        # corrupt
    ds = pydicom.dcmread(paths[2]); del ds.PixelData; ds.save_as(paths[2])                # no PixelData
    ds = pydicom.dcmread(paths[3]); ds.file_meta.TransferSyntaxUID = '1.2.840.10008.1.2.4.100'; ds.save_as(paths[3])  # MPEG2: unsupported
    paths[4].unlink()                                                                    # row -> missing file
    fa = pd.read_csv(bad / 'finding_annotations.csv', dtype=str)
    extra = fa[~fa.image_id.isin(b.image_id)].iloc[:3].copy()                         # rows of good images
    extra['finding_categories'] = ["['Mass']", "['Calcified Blob']", "['Mass']"]
    extra[['xmin', 'ymin', 'xmax', 'ymax']] = [['5000', '5000', '5100', '5100'], ['10', '10', '40', '40'], ['100', '100', '100.5', '300']]
    pd.concat([fa, extra]).to_csv(bad / 'finding_annotations.csv', index=False)        # outside, unknown class, degenerate
    f = recipe(tmp_path, bad, tmp_path / 'v')
    dry = mammo('prepare', f, '--dry-run', check=False)
    assert dry.returncode == 1 and 'missing_file' in dry.stdout and not (tmp_path / 'v').exists()
    r = mammo('prepare', f, '--quiet')
    assert 'failures: 8' in r.stdout, r.stdout
    V = load_version(vdir(f))
    assert sorted(V.failures.reason) == sorted(['truncated', 'unreadable', 'no_pixel_data', 'unsupported_transfer_syntax',
                                                'missing_file', 'box_outside_image', 'unknown_class', 'degenerate_box'])
    assert (V.failures.file != '').all()
    allids = set(pd.read_csv(bad / 'breast-level_annotations.csv', dtype=str).image_id)
    assert set(V.images.image_id) == allids - set(b.image_id)                           # nothing else lost
    assert json.loads((vdir(f) / 'manifest.json').read_text())['failures']['total'] == 8
    rs = mammo('prepare', recipe(tmp_path, bad, tmp_path / 'vs', strict=True), '--quiet', check=False)
    assert rs.returncode == 2 and '(strict)' in rs.stderr


def test_pool_after_opencv_threads_does_not_hang(tiny_set, tmp_path):
    "Regression: forking workers after the parent used OpenCV's thread pool used to deadlock."
    f = recipe(tmp_path, tiny_set, tmp_path / 'v', prepare={'out': str(tmp_path / 'v'), 'workers': 2})
    code = ("import cv2, numpy as np, sys\n"
            "a = np.random.rand(3000, 3000).astype(np.float32)\n"
            "for _ in range(3): cv2.GaussianBlur(a, (31, 31), 5)\n"
            "from mammo_nb.params import load_params\nfrom mammo_nb.prepare import prepare\n"
            f"print(prepare(load_params({str(f)!r}), progress=False)['images'])\n")
    r = subprocess.run([str(BIN / 'python'), '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == '24', r.stderr


def test_jpeg2000_decoded_at_the_level_the_version_needs(tmp_path):
    """JPEG 2000 files are decoded one wavelet level down when the output needs no more (1024-px sources, long side
    256: level 1 keeps 512 px, as the breast mask needs); `prepare.full_decode` decodes them whole. Same crops (to
    the level's pixel), boxes inside their images, other syntaxes byte-identical, the level in images.csv and the
    manifest, and a different version name."""
    from mammo_nb.synth import synth_dataset
    root = tmp_path / 'src'
    synth_dataset(root, 'tiny', seed=1, workers=1, progress=False, n_patients=3, height=1024)
    reduced, full = (recipe(tmp_path, root, tmp_path / 'v', prepare={'out': str(tmp_path / 'v'), 'workers': 1, 'full_decode': fd})
                     for fd in (False, True))
    for f in (reduced, full): mammo('prepare', f, '--quiet')
    (R, F) = (load_version(vdir(f)) for f in (reduced, full))
    assert R.dir.name != F.dir.name
    r, f = (V.images.set_index('image_id').sort_index() for V in (R, F))
    j2k = r.transfer_syntax.str.contains('2000')
    assert j2k.any() and (~j2k).any()
    assert (r.decode_reduce[j2k] == 1).all() and (r.decode_reduce[~j2k] == 0).all() and (f.decode_reduce == 0).all()
    assert R.manifest['decode'] == dict(full_decode=False, decode_safety=1.0, need_px=256,
                                        images_per_reduce_level={'0': int((~j2k).sum()), '1': int(j2k.sum())},
                                        max_pixels=80_000_000, images_with_warnings=0)
    assert F.manifest['decode']['need_px'] is None
    assert (r[['rows', 'cols']] == f[['rows', 'cols']]).all().all()             # original sizes either way
    dcrop = np.abs(np.stack(r.crop) - np.stack(f.crop))
    assert dcrop[~j2k.to_numpy()].max() == 0 and dcrop.max() <= 8, dcrop.max()  # one level: 2 px per decoded pixel
    same = {i: R.manifest['files'][r.png[i]] == F.manifest['files'][f.png[i]] for i in r.index}
    assert all(same[i] for i in r.index[~j2k]) and not any(same[i] for i in r.index[j2k])
    for V in (R, F):                                                           # every box inside its image
        b = V.boxes.merge(V.images[['image_id', 'size']], on='image_id')
        w, h = np.stack(b['size']).T
        assert len(b) and ((b.x0 >= 0) & (b.y0 >= 0) & (b.x1 <= w) & (b.y1 <= h)).all()
    k = ['image_id', 'cls']
    rb, fb = (V.boxes.sort_values(k + ['x0']).reset_index(drop=True) for V in (R, F))
    assert (rb[k] == fb[k]).all().all()
    assert np.abs(rb[['x0', 'y0', 'x1', 'y1']].to_numpy() - fb[['x0', 'y0', 'x1', 'y1']].to_numpy()).max() < 2   # output px


def test_paths_never_leave_their_roots(tiny_set, tmp_path):
    "An id with `../` is refused (`path_outside_root`) and writes nothing outside; an id with a newline gets a safe name."
    from mammo_nb.files import safe_name
    ds = tmp_path / 'root' / 'ds'
    shutil.copytree(tiny_set, ds)
    b = pd.read_csv(ds / 'breast-level_annotations.csv', dtype=str)
    fa = pd.read_csv(ds / 'finding_annotations.csv', dtype=str)
    # 1. an image id climbing out of the root to a real DICOM beside it
    nf = b.iloc[0]
    outside = tmp_path / 'root' / 'outside'; outside.mkdir()
    shutil.copy(ds / 'images' / nf.study_id / f'{nf.image_id}.dicom', outside / 'x.dicom')
    for t in (b, fa): t.loc[t.image_id == nf.image_id, 'image_id'] = '../../../outside/x'
    # 2. a study id with a newline (and its folder renamed to match)
    st = b.study_id[b.study_id != nf.study_id].iloc[0]
    (ds / 'images' / st).rename(ds / 'images' / f'{st}\nx')
    b.loc[b.study_id == st, 'study_id'] = f'{st}\nx'; fa.loc[fa.study_id == st, 'study_id'] = f'{st}\nx'
    b.to_csv(ds / 'breast-level_annotations.csv', index=False); fa.to_csv(ds / 'finding_annotations.csv', index=False)
    f = recipe(tmp_path, ds, tmp_path / 'v')
    r = mammo('prepare', f, '--quiet')
    V = load_version(vdir(f))
    assert list(V.failures.reason) == ['path_outside_root'], V.failures
    assert '..' not in V.failures.detail.iloc[0] and 'outside' not in V.failures.detail.iloc[0]
    assert sorted(p.name for p in outside.iterdir()) == ['x.dicom']                     # nothing written beside it
    assert not [p for p in tmp_path.rglob('*.png') if vdir(f).resolve() not in p.resolve().parents]
    assert len(V.images) == len(b) - 1 and V.images.study_id.map(safe_name).all() and V.images.image_id.map(safe_name).all()
    moved = V.images[~V.images.study_id.isin(b.study_id)]
    assert len(moved) == (b.study_id == f'{st}\nx').sum() and moved.study_id.str.match(r'^s[0-9a-f]{16}$').all()
    listed = [l for sp in ('train', 'val', 'test') for l in (vdir(f) / f'{sp}.txt').read_text().splitlines()]
    assert len(listed) == V.images.role.isin(['positive', 'negative']).sum()
    assert all((vdir(f) / l).resolve().is_file() and vdir(f).resolve() in (vdir(f) / l).resolve().parents for l in listed)
    assert 'failures: 1' in r.stdout


def test_the_same_picture_never_in_two_splits(tiny_set, tmp_path):
    "A re-export under another PatientID and a byte copy in another study share the original's group, so its split."
    ds_root = tmp_path / 'dup'
    shutil.copytree(tiny_set, ds_root)
    b = pd.read_csv(ds_root / 'breast-level_annotations.csv', dtype=str)
    fa = pd.read_csv(ds_root / 'finding_annotations.csv', dtype=str)
    src = b.iloc[0]
    f0 = ds_root / 'images' / src.study_id / f'{src.image_id}.dicom'
    copies = {'reexport': ('f' * 32, 'e' * 32), 'copy': ('d' * 32, 'c' * 32)}   # (study_id, image_id), new ids
    for kind, (st, im) in copies.items():
        (ds_root / 'images' / st).mkdir()
        if kind == 'copy': shutil.copy(f0, ds_root / 'images' / st / f'{im}.dicom')
        else:
            ds = pydicom.dcmread(f0); ds.PatientID = 'MIGRATED-0001'; ds.StudyInstanceUID = ds.SOPInstanceUID = f'2.25.{int(st[:8], 16)}'
            ds.save_as(ds_root / 'images' / st / f'{im}.dicom')
        b = pd.concat([b, b.iloc[[0]].assign(study_id=st, image_id=im)])
        fa = pd.concat([fa, fa[fa.image_id == src.image_id].assign(study_id=st, image_id=im)])
    b.to_csv(ds_root / 'breast-level_annotations.csv', index=False); fa.to_csv(ds_root / 'finding_annotations.csv', index=False)
    f = recipe(tmp_path, ds_root, tmp_path / 'v')
    r = mammo('prepare', f, '--quiet')
    V = load_version(vdir(f))
    same = V.images[V.images.image_id.isin([src.image_id, 'e' * 32, 'c' * 32])]
    assert len(same) == 3 and same.pixel_fingerprint.nunique() == 1 and same.split.nunique() == 1, same[['image_id', 'split']]
    from mammo_nb.split import group_keys
    assert group_keys(V.images)[same.index].nunique() == 1
    m = json.loads((vdir(f) / 'manifest.json').read_text())
    assert m['grouping']['duplicate_images'] == 3 and m['grouping']['duplicate_pictures'] == 1
    assert m['duplicates'] == dict(policy='merge', images=3, pictures=1, dropped=0, pictures_in_two_splits=0)
    assert "'images': 3" in r.stdout.split('duplicates:')[1].splitlines()[0]
    # `drop`: the first by image id stays, the two others are failures naming it; the journal of the first build is not reused
    p = load_params(recipe(tmp_path, ds_root, tmp_path / 'v', prepare={'out': str(tmp_path / 'v'), 'workers': 1, 'duplicates': 'drop'}))
    assert version_dir(p) != vdir(f)
    prepare(p, progress=False)
    D = load_version(version_dir(p))
    first = min([src.image_id, 'e' * 32, 'c' * 32])
    assert first in set(D.images.image_id) and len(D.images) == len(V.images) - 2
    dropped = D.failures[D.failures.reason == 'duplicate_image']
    assert sorted(dropped.image_id) == sorted({src.image_id, 'e' * 32, 'c' * 32} - {first})
    assert (dropped.detail == f'the same pixels as image {first} (kept)').all() and D.manifest['duplicates']['dropped'] == 2
