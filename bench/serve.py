"""Latency of `mammo serve` per image: preprocessing, inference and the explain overlay, through the HTTP API.

    python bench/serve.py RUN_DIR [DICOM_DIR] [--n N] [--device cpu|0]

RUN_DIR is a trained run (e.g. `data/versions/demo-xxxx/runs/yolov8n-xxxx`); DICOM_DIR defaults to the synthetic
set its version was built from. The app is driven through FastAPI's test client (the full request path: upload,
sniffing, temp file, ingest, CLAHE, YOLO, JSON), one image at a time after one warm-up request. Prints the median
and 90th percentile of each part, per image size. Not a test: numbers vary by machine.
"""
import argparse, json, statistics, time
from pathlib import Path

import numpy as np
import pydicom


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('run')
    ap.add_argument('dicoms', nargs='?')
    ap.add_argument('--n', type=int, default=20)
    ap.add_argument('--device', default='cpu')
    a = ap.parse_args()
    from fastapi.testclient import TestClient
    from mammo_nb.serve import create_app
    rd = Path(a.run)
    man = json.loads((rd.parent.parent / 'manifest.json').read_text())
    if not (a.dicoms or 'source' in man): raise SystemExit('this run is on a derived (self-training) version: pass DICOM_DIR')
    src = Path(a.dicoms or man['source']['root'])
    files = sorted(p for p in src.rglob('*') if p.suffix in ('.dicom', '.dcm'))[:a.n]
    c = TestClient(create_app(rd, device=a.device))
    post = lambda ep, f: c.post(ep, files={'file': ('x.dcm', f.read_bytes(), 'application/dicom')})
    post('/predict', files[0]); post('/explain', files[0])                       # warm-up: model load, first CAM
    rows = []
    for f in files:
        t0 = time.perf_counter(); j = post('/predict', f).json(); t1 = time.perf_counter()
        e = post('/explain', f); t2 = time.perf_counter()
        assert e.status_code == 200
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        rows.append(dict(size=f'{ds.Rows}x{ds.Columns}', syntax=ds.file_meta.TransferSyntaxUID.name, pre=j['timing_ms']['preprocess'],
                         inf=j['timing_ms']['inference'], predict_http=(t1 - t0) * 1e3, explain_http=(t2 - t1) * 1e3))
    q = lambda v, k: (statistics.median(v), float(np.percentile(v, 90)))
    print(f"run {rd.name} (imgsz {c.get('/health').json()['imgsz']}), device {a.device}, {len(rows)} images from {src}")
    for key in ('pre', 'inf', 'predict_http', 'explain_http'):
        v = [r[key] for r in rows]
        print(f'  {key:13s} median {q(v, key)[0]:8.1f} ms   p90 {q(v, key)[1]:8.1f} ms')
    by = {}
    for r in rows: by.setdefault((r['size'], r['syntax']), []).append(r['predict_http'])
    for (s, t), v in sorted(by.items()): print(f'  /predict {s} {t}: median {statistics.median(v):.0f} ms (n={len(v)})')


if __name__ == '__main__':
    main()
