"""Load and abuse test of `mammo serve`: the real server (the `mammo serve` CLI, uvicorn) on loopback, concurrent good
requests with decompression bombs and oversize uploads mixed in.

    python bench/serve_load.py RUN_DIR [DICOM_DIR] [--good 48] [--bombs 16] [--clients 8] [--workers 2]

RUN_DIR is a trained run (e.g. `data/versions/demo-xxxx/runs/yolov8n-xxxx`); DICOM_DIR defaults to the synthetic set
its version was built from. Every good request must be answered 200, every bomb 413; prints requests/s, p50/p95
latency of the good requests, and the server's resident memory (idle, peak) sampled from /proc every 20 ms.
`tests/test_serve.py` runs `load_test` small (bounded in count and time); the figures in `bench/README.md` come from
`main`. Loopback only.
"""
from __future__ import annotations
import argparse, io, json, os, random, socket, struct, subprocess, sys, tempfile, threading, time, zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom

BIN = Path(sys.executable).parent


def png_claiming(w: int, h: int) -> bytes:
    "A ~1 KB PNG whose header claims w x h pixels."
    chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 0, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b'\0' * 1000)) + chunk(b'IEND', b''))


def j2k_claiming(data: bytes, side: int = 60000) -> bytes | None:
    "A JPEG 2000 DICOM `data` whose codestream (not its header) claims side x side pixels; None for another syntax."
    from pydicom.encaps import encapsulate, generate_frames
    ds = pydicom.dcmread(io.BytesIO(data))
    if 'JPEG 2000' not in ds.file_meta.TransferSyntaxUID.name: return None
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    s = frame.find(b'\xff\x4f\xff\x51') + 2
    frame[s + 6:s + 14] = struct.pack('>2I', side, side)
    ds.PixelData = encapsulate([bytes(frame)])
    b = io.BytesIO(); ds.save_as(b); return b.getvalue()


def deflate_bomb(data: bytes, inflated_mb: int = 300) -> bytes:
    "The DICOM `data` as Deflated Explicit VR Little Endian with an `inflated_mb` MB private element: < 1 MB on disk."
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.decompress() if ds.file_meta.TransferSyntaxUID.is_compressed else None
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    b = io.BytesIO(); ds.save_as(b, implicit_vr=False, little_endian=True); raw = b.getvalue()
    fp = io.BytesIO(raw); read_preamble(fp, False)
    read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=lambda t, vr, n: t >> 16 != 2)
    z, n = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS), inflated_mb << 20
    parts = [raw[:fp.tell()], z.compress(zlib.decompress(raw[fp.tell():], -zlib.MAX_WBITS) + struct.pack('<HH', 0x7FE1, 0x1010)
                                          + b'OB\0\0' + struct.pack('<I', n))]
    parts += [z.compress(bytes(1 << 20)) for _ in range(inflated_mb)] + [z.flush()]
    return b''.join(parts)


def dicom_claiming(data: bytes, rows: int, cols: int) -> bytes:
    "The DICOM `data` with its header's Rows and Columns set to `rows` x `cols`."
    ds = pydicom.dcmread(io.BytesIO(data)); ds.Rows, ds.Columns = rows, cols
    b = io.BytesIO(); ds.save_as(b); return b.getvalue()


def bombs(samples: list[Path], oversize_mb: float) -> dict[str, bytes]:
    "One of each hostile upload, made from the good `samples` (a JPEG 2000 one among them if there is one)."
    data = samples[0].read_bytes()
    out = {'png 20000x20000 (1 KB)': png_claiming(20000, 20000), 'dicom header 60000x60000': dicom_claiming(data, 60000, 60000),
           'deflated dicom, 300 MB inflated': deflate_bomb(data), 'oversize upload': os.urandom(int(oversize_mb * 2**20))}
    for f in samples:
        if (j := j2k_claiming(f.read_bytes())) is not None: out['jpeg 2000 codestream 60000x60000'] = j; break
    return out


def rss_mb(pid: int, field: str = 'VmRSS') -> float:
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith(field + ':'): return int(line.split()[1]) / 1024
    return float('nan')


def load_test(run: str | Path, files: list[Path], good: int = 48, n_bombs: int = 16, clients: int = 8, workers: int = 2,
              max_upload_mb: float = 16, timeout_s: float = 120, seed: int = 0) -> dict:
    """Start `mammo serve` on a free loopback port, send `good` predictions of `files` and `n_bombs` hostile uploads
    (cycling through `bombs`) in a shuffled order from `clients` threads, and measure."""
    import requests
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix='mammo-load-'))
    rec = tmp / 'serve.yaml'
    rec.write_text(json.dumps({'name': 'load', 'serve': {'workers': workers, 'queue': good + n_bombs, 'timeout_s': timeout_s,
                                                       'max_upload_mb': max_upload_mb}, 'train': {'threads': 1}}))
    log = open(tmp / 'server.log', 'w')
    srv = subprocess.Popen([str(BIN / 'mammo'), 'serve', '--run', str(run), '--port', str(port), '--params', str(rec)],
                           stdout=log, stderr=subprocess.STDOUT, env={**os.environ, 'YOLO_OFFLINE': '1'})
    url = f'http://127.0.0.1:{port}'
    try:
        for _ in range(240):
            try: requests.get(url + '/health', timeout=2).raise_for_status(); break
            except requests.RequestException: time.sleep(0.5)
        else: raise RuntimeError('server did not start: ' + (tmp / 'server.log').read_text()[-2000:])
        post = lambda name, body, ct: requests.post(url + '/predict', files={'file': (name, body, ct)}, timeout=timeout_s + 60)
        post('warm.dcm', files[0].read_bytes(), 'application/dicom').raise_for_status()      # model loaded, first image
        idle = rss_mb(srv.pid)
        hostile = bombs(files, oversize_mb=max_upload_mb * 1.5)
        kinds = list(hostile)
        jobs = [('good', files[i % len(files)]) for i in range(good)] + [('bomb', kinds[i % len(kinds)]) for i in range(n_bombs)]
        random.Random(seed).shuffle(jobs)
        peak, stop = [idle], threading.Event()
        def sample():
            while not stop.is_set(): peak.append(rss_mb(srv.pid)); time.sleep(0.02)
        def one(job):
            kind, what = job
            body = what.read_bytes() if kind == 'good' else hostile[what]
            t0 = time.perf_counter()
            try: r = post('x.dcm' if kind == 'good' or 'png' not in what else 'x.png', body, 'image/png' if kind == 'bomb' and 'png' in what else 'application/dicom'); code = r.status_code
            except requests.ConnectionError: code = 'reset'            # the server may close on a body it refused to read
            detail = r.json().get('detail', '') if code != 200 and code != 'reset' and r.headers.get('content-type') == 'application/json' else ''
            return kind, what if kind == 'bomb' else f'good {code} {detail}'.strip(), code, time.perf_counter() - t0
        th = threading.Thread(target=sample, daemon=True); th.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as ex: res = list(ex.map(one, jobs))
        wall = time.perf_counter() - t0
        stop.set(); th.join()
        alive = requests.get(url + '/health', timeout=5).status_code == 200
        hwm = rss_mb(srv.pid, 'VmHWM')
    finally:
        srv.terminate()
        try: srv.wait(20)
        except subprocess.TimeoutExpired: srv.kill()
        log.close()
    lat = [t for k, _, c, t in res if k == 'good' and c == 200]
    answers = {}
    for k, w, c, _ in res:
        if k == 'good': answers[w] = answers.get(w, 0) + 1
    bomb_codes = {}
    for k, w, c, _ in res:
        if k == 'bomb': bomb_codes.setdefault(w, []).append(c)
    return dict(good=good, good_200=sum(k == 'good' and c == 200 for k, _, c, _ in res),
                bombs=n_bombs, bombs_413=sum(k == 'bomb' and c == 413 for k, _, c, _ in res),
                bomb_codes={w: sorted(set(map(str, c))) for w, c in bomb_codes.items()}, good_answers=answers,
                clients=clients, workers=workers, seconds=round(wall, 2), requests_per_s=round(len(jobs) / wall, 2),
                good_p50_ms=round(float(np.percentile(lat, 50)) * 1e3, 1) if lat else None,
                good_p95_ms=round(float(np.percentile(lat, 95)) * 1e3, 1) if lat else None,
                rss_idle_mb=round(idle, 1), rss_peak_mb=round(max(max(peak), hwm), 1), alive_after=alive,
                log=(tmp / 'server.log').read_text()[-4000:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('run'); ap.add_argument('dicoms', nargs='?')
    ap.add_argument('--good', type=int, default=48); ap.add_argument('--bombs', type=int, default=16)
    ap.add_argument('--clients', type=int, default=8)
    ap.add_argument('--workers', type=int, nargs='+', default=[1, 2], help='serve.workers settings compared side by side')
    a = ap.parse_args()
    rd = Path(a.run)
    man = json.loads((rd.parent.parent / 'manifest.json').read_text())
    src = Path(a.dicoms or man['source']['root'])
    files = sorted(p for p in src.rglob('*') if p.suffix in ('.dicom', '.dcm'))[:16]
    sizes = sorted({f'{d.Rows}x{d.Columns}' for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)})
    print(f"run {rd.name}; {len(files)} distinct images ({', '.join(sizes)}) from {src}; {a.clients} clients, "
          f"{a.good} good requests + {a.bombs} hostile ones, shuffled")
    rows = []
    for w in a.workers:
        r = load_test(rd, files, a.good, a.bombs, a.clients, w, max_upload_mb=64)
        r.pop('log'); rows.append(r)
    keys = ['good_200', 'bombs_413', 'seconds', 'requests_per_s', 'good_p50_ms', 'good_p95_ms', 'rss_idle_mb', 'rss_peak_mb', 'alive_after']
    print(f"{'serve.workers':>16s}" + ''.join(f'{r["workers"]:>12d}' for r in rows))
    for k in keys: print(f'{k:>16s}' + ''.join(f'{str(r[k]):>12s}' for r in rows))
    print('bomb kinds and their answers:', rows[-1]['bomb_codes'])


if __name__ == '__main__':
    main()
