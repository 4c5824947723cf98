"""Speed and memory of the prepare step, side by side with its floor (decode alone) and the naive pipeline.

    python bench/prepare.py [DIR] [--naive-n N] [--long-side PX]

DIR defaults to the `full`-preset synthetic set (4084 x 3328, 20 images; written first if missing). In one run,
on the same files:

1. the real `ingest_images` over all files with 1 and then 2 worker processes, with JPEG 2000 decoded at the
   level the version needs (today's default) and with `prepare.full_decode`: wall time, speed-up, peak RSS per
   worker;
2. per file, one thread: decode alone (pydicom read + the chosen decoder) / the whole prepare step for one image
   (`mammo_nb.prepare.process_image`: decode, VOI LUT, breast mask, crop, resize, CLAHE, PNG) / the naive pipeline
   (pydicom `apply_voi_lut` -> float -> scikit-image `equalize_adapthist` at full resolution -> PNG; on the first
   N files of each transfer syntax, it takes seconds per image).

3. JPEG 2000 files only, at output long sides 640, 1024 and 2048: the full decode alone, the prepare step with the
   full decode (`prepare.full_decode: true`) and with the reduced decode, the level chosen, and the projected wall
   time of a 20,000-image VinDr-size ingest (every file JPEG 2000) on 2 cores and on a 16-task Slurm array.

Ratios are printed per transfer syntax (uncompressed, JPEG 2000, JPEG-LS). Not a test: numbers vary by machine.
"""
import argparse, os, resource, shutil, statistics, tempfile, time
from pathlib import Path

os.environ.setdefault('OMP_NUM_THREADS', '1')
import cv2
import numpy as np
import pandas as pd
import pydicom

from mammo_nb.ingest import decode
from mammo_nb.params import load_params
from mammo_nb.prepare import ingest_images, process_image
from mammo_nb.synth import synth_dataset

cv2.setNumThreads(1)
ROOT = Path(__file__).resolve().parents[1]


def naive(path, out):
    "The seed-style pipeline: pydicom VOI in float, scikit-image CLAHE at full resolution, 8-bit PNG."
    from skimage import exposure
    ds = pydicom.dcmread(path)
    x = pydicom.pixels.apply_voi_lut(ds.pixel_array, ds).astype(np.float64)
    x = (x - x.min()) / max(x.max() - x.min(), 1e-6)
    if ds.PhotometricInterpretation == 'MONOCHROME1': x = 1 - x
    y = exposure.equalize_adapthist(x, clip_limit=0.01)
    cv2.imwrite(str(out), (y * 255).astype(np.uint8))


def timed(fn, *a):
    t = time.perf_counter(); fn(*a); return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('dir', nargs='?', default='data/bench/synth-full')
    ap.add_argument('--naive-n', type=int, default=2, help='files per transfer syntax for the (slow) naive pipeline')
    ap.add_argument('--long-side', type=int, default=1024)
    a = ap.parse_args()
    root = Path(a.dir)
    if not (root / 'synth_info.json').exists(): synth_dataset(root, 'full', seed=0, workers=2)
    files = sorted(root.rglob('*.dicom'))
    tmp = Path(tempfile.mkdtemp())
    clahe = dict(clip_limit=2.0, tile_grid=8, long_side=a.long_side, bit_depth=8)
    print('Whole shard through ingest_images (process pool), same files (run first, so the parent process is still small when it forks):')
    res = {}
    for full in (True, False):
        for w in (1, 2):
            p = load_params(ROOT / 'params' / 'demo.yaml', {'source': {'root': str(root)},
                            'prepare': {'out': str(tmp / f'v{w}{full}'), 'workers': w, 'full_decode': full}, 'clahe': {'long_side': a.long_side}})
            res[full, w] = r = ingest_images(p, progress=False)
            print(f"  {'full decode' if full else 'reduced J2K'} {w} worker(s): {r['seconds']:.1f} s, {r['images_per_s']:.2f} img/s, "
                  f"peak RSS per worker {r['peak_rss_mb_per_worker']:.0f} MB")
        print(f"  speed-up 1 -> 2 workers: {res[full, 1]['seconds'] / res[full, 2]['seconds']:.2f}x (cores here: {os.cpu_count()})")

    rows = []
    seen = {}
    for k, p in enumerate(files):
        ts = pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
        dec = timed(lambda: decode(pydicom.dcmread(p)))
        job = dict(image_id=p.stem, src=str(p), png=f'{p.stem}.png', dst=str(tmp / f'{p.stem}.png'), margin=4, clahe=clahe, key='00' * 32)
        rec = {}
        prep = timed(lambda: rec.update(process_image(job)))
        assert rec['ok'], rec
        nv = None
        if seen.get(ts, 0) < a.naive_n:
            nv = timed(naive, p, tmp / f'{p.stem}-naive.png'); seen[ts] = seen.get(ts, 0) + 1
        rows.append(dict(syntax=ts, file=p.name, decode_s=dec, prepare_s=prep, naive_s=nv))
        print(f'{k + 1}/{len(files)} {ts[:24]:24s} decode {dec * 1e3:7.0f} ms  prepare {prep * 1e3:7.0f} ms' +
              (f'  naive {nv * 1e3:7.0f} ms' if nv else ''), flush=True)
    df = pd.DataFrame(rows)
    g = df.groupby('syntax')
    tab = pd.DataFrame({'files': g.size(), 'decode ms': g.decode_s.median() * 1e3, 'prepare ms': g.prepare_s.median() * 1e3,
                        'naive ms': g.naive_s.median() * 1e3})
    tab['prepare / decode'] = tab['prepare ms'] / tab['decode ms']
    tab['naive / prepare'] = tab['naive ms'] / tab['prepare ms']
    tab['prepare img/s/core'] = 1e3 / tab['prepare ms']
    print('\nPer image, one thread (median ms):')
    print(tab.round(2).to_string())

    j2k_levels(files, tmp, res)
    shutil.rmtree(tmp)


def j2k_levels(files, tmp, pool, n_images=20_000, array_tasks=16):
    "JPEG 2000 only: full decode alone vs the prepare step with the full and with the reduced decode, per long side."
    j2k = [p for p in files if '2000' in pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID.name]
    rows = []
    for ls in (640, 1024, 2048):
        clahe = dict(clip_limit=2.0, tile_grid=8, long_side=ls, bit_depth=8)
        for p in j2k:
            job = dict(image_id=p.stem, src=str(p), png=f'{p.stem}.png', dst=str(tmp / f'{p.stem}.png'), margin=4, clahe=clahe, key='00' * 32)
            dec = timed(lambda: decode(pydicom.dcmread(p)))
            full = timed(lambda: process_image(job))
            rec = {}
            red = timed(lambda: rec.update(process_image(dict(job, need=ls))))
            assert rec['ok'], rec
            rows.append(dict(long_side=ls, level=rec['decode_reduce'], decode_s=dec, full_s=full, reduced_s=red))
    df = pd.DataFrame(rows)
    g = df.groupby('long_side')
    tab = pd.DataFrame({'files': g.size(), 'level': g['level'].agg(lambda x: '/'.join(map(str, sorted(set(x))))),
                        'full decode ms': g.decode_s.median() * 1e3, 'prepare full ms': g.full_s.median() * 1e3,
                        'prepare reduced ms': g.reduced_s.median() * 1e3})
    tab['full / reduced'] = tab['prepare full ms'] / tab['prepare reduced ms']
    tab['reduced img/s/core'] = 1e3 / tab['prepare reduced ms']
    print(f'\nJPEG 2000 files only, one thread (median ms), by output long side:')
    print(tab.round(2).to_string())
    s1, s2 = pool[False, 1]['seconds'], pool[False, 2]['seconds']
    scale = s1 / s2
    print(f'\nProjected {n_images:,}-image VinDr-size ingest (all JPEG 2000, 4084 x 3328), from the per-core rates above'
          f' and the measured 1 -> 2 worker scaling ({scale:.2f}x; a Slurm array task is one core each):')
    for ls, r in tab.iterrows():
        full_h, red_h = n_images * r['prepare full ms'] / 1e3 / 3600, n_images * r['prepare reduced ms'] / 1e3 / 3600
        print(f"  long side {ls:4d}: {red_h:5.2f} core-hours reduced vs {full_h:5.2f} full; this 2-core machine "
              f"{red_h / scale:5.2f} h vs {full_h / scale:5.2f} h; {array_tasks}-task array {red_h / array_tasks * 60:5.1f} min vs {full_h / array_tasks * 60:5.1f} min")


if __name__ == '__main__':
    main()
