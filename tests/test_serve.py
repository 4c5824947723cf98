"""`mammo serve`: the FastAPI app on a run trained on the tiny preset (test client), bad uploads answered with a 4xx
while the server stays up, no PHI echoed, the same preprocessing as the dataset version, and a real browser
(Debian's headless chromium) uploading a synthetic DICOM through the page."""
import contextlib, json, os, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from conftest import BIN, ROOT, chromium, mammo
sys.path.insert(0, str(ROOT / 'bench'))
from serve_load import deflate_bomb, dicom_claiming, j2k_claiming, load_test, png_claiming
from mammo_nb.clahe import to_original
from mammo_nb.params import load_params
from mammo_nb.prepare import version_dir
from mammo_nb.runs import run_dir
from mammo_nb.trainutil import check_version

CONF = 0.0005


@pytest.fixture(scope='module')
def trained(tiny_run, tiny_set):
    "The session's tiny run, its version and the raw set it was built from."
    f, _ = tiny_run
    p = load_params(f)
    return p, run_dir(p, 'yolov8n.yaml'), check_version(p), tiny_set


@pytest.fixture(scope='module')
def client(trained):
    from fastapi.testclient import TestClient
    from mammo_nb.serve import create_app
    p, rd, V, raw = trained
    return TestClient(create_app(rd, max_upload_mb=2, conf=CONF))         # a 2-epoch model scores low


def lesion_image(V, raw):
    "A DICOM of the tiny set with a lesion box, its version row."
    r = V.images[V.images.role == 'positive'].iloc[0]
    return raw / r.path, r


def test_health_and_identifiers(client, trained):
    p, rd, V, raw = trained
    h = client.get('/health').json()
    import hashlib
    assert h['status'] == 'ok' and h['run'] == rd.name and h['version'] == V.manifest['version']
    assert h['manifest_sha256'] == hashlib.sha256((V.dir / 'manifest.json').read_bytes()).hexdigest()
    op = json.loads((rd / 'eval' / 'metrics.json').read_text())['operating_point']
    assert 'Research use only' in h['notice']
    if op['threshold'] is None: assert h['threshold_source'].startswith('default') and h['threshold'] == 0.25   # val has no positive image
    else: assert h['threshold_source'].startswith('operating point') and h['threshold'] == op['threshold']


def test_predict_dicom_matches_the_version_pipeline(client, trained):
    """Served scores and boxes equal evaluation's predictions on the version's PNG, mapped to original pixels."""
    from mammo_nb.evaluate import predict
    p, rd, V, raw = trained
    f, row = lesion_image(V, raw)
    r = client.post('/predict', files={'file': ('SMITH^ANNA_1960.dcm', f.read_bytes(), 'application/dicom')})
    assert r.status_code == 200, r.text
    j = r.json()
    ds = pydicom.dcmread(f)
    assert (j['image']['rows'], j['image']['cols']) == (ds.Rows, ds.Columns)
    assert set(j['image_scores']) == set(V.manifest['classes']) and j['boxes']
    for b in j['boxes']:
        x0, y0, x1, y1 = b['box']
        assert 0 <= x0 < x1 <= ds.Columns and 0 <= y0 < y1 <= ds.Rows
    ev = predict(rd / 'weights' / 'best.pt', V, 'x', p.train.imgsz, conf=CONF, iou=0.6, max_det=100, progress=False,
                 ims=V.images[V.images.image_id == row.image_id])
    for c, s in j['image_scores'].items():
        assert abs(s - ev[ev.cls == c].score.max() if (ev.cls == c).any() else s) < 1e-3, c
    top = ev.sort_values('score', ascending=False).iloc[0]
    mapped = to_original([top.x0, top.y0, top.x1, top.y1], row.crop, row.scale)[0]
    assert np.abs(np.array(j['boxes'][0]['box']) - np.clip(mapped, 0, [ds.Columns, ds.Rows] * 2)).max() < 1.0
    text = r.text
    for v in (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber, ds.InstitutionName, 'SMITH^ANNA'):
        assert v not in text, v                                                  # no PHI, not even the file name
    assert all(t > 0 for t in j['timing_ms'].values())


def test_predict_png_and_explain(client, trained):
    p, rd, V, raw = trained
    f, row = lesion_image(V, raw)
    png = cv2.imencode('.png', cv2.imread(str(V.dir / row.png), cv2.IMREAD_UNCHANGED))[1].tobytes()
    r = client.post('/predict?preview=true', files={'file': ('x.png', png, 'image/png')})
    assert r.status_code == 200 and r.json()['image']['format'] == 'PNG' and r.json()['preview_png']
    e = client.post('/explain', files={'file': ('x.dcm', f.read_bytes(), 'application/dicom')})
    assert e.status_code == 200 and e.headers['content-type'] == 'image/png' and e.headers['x-research-use-only'] == 'true'
    im = cv2.imdecode(np.frombuffer(e.content, np.uint8), cv2.IMREAD_COLOR)
    assert im is not None and im.ndim == 3 and min(im.shape[:2]) > 32
    assert (np.abs(im[..., 0].astype(int) - im[..., 2]) > 30).mean() > 0.01        # a coloured map, not only grey




def test_bad_uploads_get_4xx_and_the_server_stays_up(client, trained):
    p, rd, V, raw = trained
    f, _ = lesion_image(V, raw)
    data = f.read_bytes()
    cases = {
        'text content type': (('notes.txt', b'hello', 'text/plain'), 415, 'content type'),
        'not an image': (('x.dcm', b'hello, this is not an image at all' * 10, 'application/dicom'), 415, 'not a DICOM'),
        'truncated DICOM': (('x.dcm', data[:len(data) // 3], 'application/dicom'), 422, 'could not be read'),
        'oversize': (('big.png', b'\x89PNG\r\n\x1a\n' + os.urandom(3 * 2**20), 'image/png'), 413, 'limit'),
        'corrupt PNG': (('x.png', b'\x89PNG\r\n\x1a\n' + b'\0' * 500, 'image/png'), 422, 'could not be read'),
        'decompression bomb': (('bomb.png', png_claiming(20000, 20000), 'image/png'), 413, 'too_large'),
        'header bomb': (('bomb.dcm', dicom_claiming(data, 60000, 60000), 'application/dicom'), 413, 'too_large'),
        'codestream bomb': (('bomb.dcm', j2k_bomb(V, raw), 'application/dicom'), 413, 'too_large'),
        'deflate bomb (300 MB inflated)': (('bomb.dcm', deflate_bomb(data), 'application/dicom'), 413, 'too_large'),
    }
    for name, (file, code, msg) in cases.items():
        r = client.post('/predict', files={'file': file})
        assert r.status_code == code, (name, r.status_code, r.text)
        assert msg in r.json()['detail'], (name, r.text)
    for p_ in ('/predict', '/explain'):                                               # both endpoints refuse a bomb
        assert client.post(p_, files={'file': ('bomb.png', png_claiming(20000, 20000), 'image/png')}).status_code == 413
    assert client.post('/predict').status_code == 422                               # no file at all
    assert client.get('/health').status_code == 200


def j2k_bomb(V, raw) -> bytes:
    "A JPEG 2000 DICOM of the tiny set whose codestream claims 60000 x 60000 pixels."
    j2k = V.images[V.images.transfer_syntax.str.contains('JPEG 2000')].path
    return j2k_claiming((raw / j2k.iloc[0]).read_bytes())


def test_upload_limit_before_the_body_is_read(client):
    "An oversize request is refused from its Content-Length, and a chunked one (no length) once it passes the limit."
    big = b'x' * (4 * 2**20)
    r = client.post('/predict', content=big, headers={'content-type': 'multipart/form-data; boundary=b'})
    assert r.status_code == 413 and 'upload limit' in r.json()['detail']
    chunks = (big[i:i + 2**16] for i in range(0, len(big), 2**16))                 # httpx sends a generator chunked
    r = client.post('/predict', content=chunks, headers={'content-type': 'multipart/form-data; boundary=b'})
    assert r.status_code == 413 and 'upload limit' in r.json()['detail']
    assert client.get('/health').json()['limits']['max_upload_mb'] == 2


def test_load_with_bombs_mixed_in(trained):
    """The real server (`mammo serve`, uvicorn) under 6 concurrent clients: 16 good requests and 10 hostile ones
    (bombs of every kind, an oversize upload). Every good one answered, every bomb 413, and the server's peak memory
    within 600 MB of its idle size (two workers; a bomb is refused before its claimed size is allocated)."""
    p, rd, V, raw = trained
    files = [raw / x for x in V.images.path[:8]]
    r = load_test(rd, files, good=16, n_bombs=10, clients=6, workers=2, max_upload_mb=4)
    assert r['good_200'] == 16 and r['bombs_413'] == 10, r
    assert len(r['bomb_codes']) == 5 and r['alive_after'], r
    assert r['rss_peak_mb'] - r['rss_idle_mb'] < 600, r


@contextlib.contextmanager
def browser_on(rd: Path):
    """The real CLI server (`mammo serve`) on a free loopback port for run `rd`, and a headless chromium driver
    (selenium) with the page open: yields the driver; skips the test where chromium cannot be installed."""
    paths = chromium()
    if paths is None: pytest.skip('chromium / chromedriver not installable here (needs root and apt)')
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    srv = subprocess.Popen([str(BIN / 'mammo'), 'serve', '--run', str(rd), '--port', str(port)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(120):
            try: urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2); break
            except OSError: time.sleep(0.5)
        else: pytest.fail('server did not start: ' + srv.stdout.read(2000))
        opts = webdriver.ChromeOptions()
        opts.binary_location = paths[0]
        for a in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu'): opts.add_argument(a)
        drv = webdriver.Chrome(service=Service(paths[1]), options=opts)
        try:
            drv.get(f'http://127.0.0.1:{port}/')
            yield drv
        finally: drv.quit()
    finally:
        srv.terminate(); srv.wait(10)


def test_browser_upload_shows_overlay(trained, tmp_path):
    """The real CLI server on 127.0.0.1, and headless chromium uploading a synthetic DICOM through the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    p, rd, V, raw = trained
    with browser_on(rd) as drv:
        assert 'Research use only' in drv.find_element(By.CLASS_NAME, 'notice').text
        f, _ = lesion_image(V, raw)
        drv.find_element(By.ID, 'file').send_keys(str(f))
        drv.find_element(By.ID, 'go').click()
        WebDriverWait(drv, 120).until(lambda d: d.execute_script(
            "const i = document.getElementById('overlay'); return i.complete && i.naturalWidth > 0;"))
        assert drv.execute_script("return document.getElementById('preview').naturalWidth") > 0
        assert len(drv.find_elements(By.CSS_SELECTOR, '#scores tr')) == 1 + len(V.manifest['classes'])
        assert drv.find_element(By.ID, 'error').text == ''


HOSTILE = '<img src=x onerror="window.pwned=1">'


def hostile_copy(rd: Path, tmp: Path) -> Path:
    "The run copied under a version whose name and first class, and a run folder whose name, are markup."
    man = json.loads((rd.parent.parent / 'manifest.json').read_text())
    man['version'], man['classes'][0] = HOSTILE + 'v', HOSTILE + 'c'
    (tmp / 'v' / 'runs').mkdir(parents=True)
    (tmp / 'v' / 'manifest.json').write_text(json.dumps(man))
    return Path(shutil.copytree(rd, tmp / 'v' / 'runs' / (HOSTILE + 'r')))


def test_page_is_static_with_a_content_security_policy(client):
    "No inline script or style, no innerHTML: the page's script builds the document from data with textContent only."
    from mammo_nb.serve import PAGE, PAGE_JS
    for path in ('/', '/app.js', '/app.css', '/health'):
        r = client.get(path)
        assert r.status_code == 200
        csp = r.headers['content-security-policy']
        assert "script-src 'self'" in csp and 'unsafe-inline' not in csp and r.headers['x-content-type-options'] == 'nosniff'
    import re
    assert '<script>' not in PAGE and '<style' not in PAGE and not re.search(r'\son\w+\s*=', PAGE + PAGE_JS)   # no inline handler
    assert 'innerHTML' not in PAGE_JS and 'outerHTML' not in PAGE_JS and 'insertAdjacentHTML' not in PAGE_JS
    r = client.post('/predict', files={'file': ('x.png', b'\x89PNG....', 'text/<script>alert(1)</script>')})
    assert r.status_code == 415 and 'script' not in r.text                    # the part's content type is not echoed
    r = client.post('/predict', data={'notfile': '<b>hostile</b>'})
    assert r.status_code == 422 and 'hostile' not in r.text                   # nor pydantic's `input`


def test_browser_shows_hostile_names_as_text(trained, tmp_path):
    """A run, version and class named with markup: headless chromium shows the characters, runs no script of theirs."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    p, rd, V, raw = trained
    with browser_on(hostile_copy(rd, tmp_path)) as drv:
        WebDriverWait(drv, 30).until(lambda d: 'run ' in d.find_element(By.ID, 'model').text)
        text = drv.find_element(By.ID, 'model').text
        assert HOSTILE + 'r' in text and HOSTILE + 'v' in text and HOSTILE + 'c' in text   # shown as characters
        assert drv.execute_script('return window.pwned') is None                          # and never run
        assert len(drv.find_elements(By.TAG_NAME, 'img')) == 2                            # preview and overlay only


@pytest.mark.parametrize('field, value', [('NumberOfFrames', '1000000000'), ('NumberOfFrames', '-1'),
                                          ('PhotometricInterpretation', 'YBR_NONSENSE'), ('RescaleSlope', '0'),
                                          ('RescaleSlope', '1e308'), ('TransferSyntaxUID', '1.2.3.999'),
                                          ('BitsAllocated', 7), ('SamplesPerPixel', 3)])
def test_impossible_header_values_get_a_4xx(client, trained, tmp_path, field, value):
    "A DICOM whose header holds an impossible value: a 4xx with a reason code, nothing of the header echoed, server up."
    p, rd, V, raw = trained
    f, _ = lesion_image(V, raw)
    ds = pydicom.dcmread(f)
    if field == 'TransferSyntaxUID': ds.file_meta.TransferSyntaxUID = value
    else: setattr(ds, field, value)
    out = tmp_path / 'bad.dcm'
    ds.save_as(out, enforce_file_format=False)
    r = client.post('/predict', files={'file': ('x.dcm', out.read_bytes(), 'application/dicom')})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert str(value) not in r.text or str(value) in ('1', '3', '7'), r.text
    assert client.get('/health').status_code == 200
