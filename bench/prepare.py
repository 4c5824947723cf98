"""Speed and memory of the prepare step, side by side with its floor (decode alone) and the naive pipeline.

    python bench/prepare.py [DIR] [--naive-n N] [--long-side PX]

DIR defaults to the `full`-preset synthetic set (4084 x 3328, 20 images; written first if missing). In one run,
on the same files:

1. the real `ingest_images` over all files with 1 and then 2 worker processes: wall time, speed-up, peak RSS per
   worker;
2. per file, one thread: decode alone (pydicom read + the chosen decoder) / the whole prepare step for one image
   (`mammo_nb.prepare.process_image`: decode, VOI LUT, breast mask, crop, resize, CLAHE, PNG) / the naive pipeline
   (pydicom `apply_voi_lut` -> float -> scikit-image `equalize_adapthist` at full resolution -> PNG; on the first
   N files of each transfer syntax, it takes seconds per image).

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
    for w in (1, 2):
        p = load_params(ROOT / 'params' / 'demo.yaml', {'source': {'root': str(root)},
                        'prepare': {'out': str(tmp / f'v{w}'), 'workers': w}, 'clahe': {'long_side': a.long_side}})
        res[w] = ingest_images(p, progress=False)
        print(f"  {w} worker(s): {res[w]['seconds']:.1f} s, {res[w]['images_per_s']:.2f} img/s, "
              f"peak RSS per worker {res[w]['peak_rss_mb_per_worker']:.0f} MB")
    print(f"  speed-up 1 -> 2 workers: {res[1]['seconds'] / res[2]['seconds']:.2f}x (cores here: {os.cpu_count()})")

    rows = []
    seen = {}
    for k, p in enumerate(files):
        ts = pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
        dec = timed(lambda: decode(pydicom.dcmread(p)))
        job = dict(image_id=p.stem, src=str(p), png=f'{p.stem}.png', dst=str(tmp / f'{p.stem}.png'), margin=4, clahe=clahe)
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

    shutil.rmtree(tmp)


if __name__ == '__main__':
    main()
