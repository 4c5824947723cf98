"""Decode speed of the DICOM pixel-data decoders we can use, side by side on the same files in one run.

    python bench/decode.py [DIR] [--repeat N]

DIR defaults to a `full`-preset synthetic set (4084 x 3328, written first if missing). For each transfer syntax
it decodes every file with every available decoder, checks they agree bit for bit, and prints the median ms per
image and the ratio to the fastest. Single-threaded throughout, so the figures are per core.
"""
import argparse, statistics, time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import generate_frames

from mammo_nb.ingest import decode
from mammo_nb.synth import synth_dataset


def _imagecodecs(path):
    import imagecodecs
    ds = pydicom.dcmread(path)
    ts = ds.file_meta.TransferSyntaxUID
    if not ts.is_compressed:
        return np.frombuffer(ds.PixelData, '<u2').reshape(ds.Rows, ds.Columns)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    if ts == pydicom.uid.JPEG2000Lossless: return imagecodecs.jpeg2k_decode(frame, numthreads=1)
    if ts == pydicom.uid.JPEGLSLossless: return imagecodecs.jpegls_decode(frame)
    raise NotImplementedError(ts.name)


def _plugin(name):
    def g(path):
        ds = pydicom.dcmread(path)
        ds.pixel_array_options(decoding_plugin=name)
        return ds.pixel_array
    return g


DECODERS = {'pydicom+pylibjpeg': _plugin('pylibjpeg'), 'pydicom+gdcm': _plugin('gdcm'),
            'pydicom frames+imagecodecs': _imagecodecs,
            'mammo_nb.ingest.decode (chosen)': lambda p: decode(pydicom.dcmread(p))[0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('dir', nargs='?', default='data/bench/synth-full')
    ap.add_argument('--repeat', type=int, default=3)
    a = ap.parse_args()
    root = Path(a.dir)
    if not (root / 'synth_info.json').exists(): synth_dataset(root, 'full', seed=0, workers=2)
    files = sorted(root.rglob('*.dicom'))
    by_ts = {}
    for p in files: by_ts.setdefault(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID.name, []).append(p)
    print(f'{len(files)} files from {root}; shape {pydicom.dcmread(files[0]).pixel_array.shape}; median of {a.repeat} runs per file\n')
    print(f"{'transfer syntax':45s} {'decoder':32s} {'ms/image':>9s} {'x fastest':>9s}")
    for ts, ps in sorted(by_ts.items()):
        res = {}
        for name, fn in DECODERS.items():
            try:
                fn(ps[0])                                   # probe: is this decoder available for this syntax?
            except Exception as e:
                print(f'{ts:45s} {name:32s} {"n/a":>9s}   ({type(e).__name__}: {str(e)[:60]})'); continue
            times = []
            for p in ps:
                for _ in range(a.repeat):
                    t0 = time.perf_counter(); arr = fn(p); times.append(time.perf_counter() - t0)
                assert np.array_equal(arr, DECODERS['pydicom+gdcm'](p)), f'{name} disagrees on {p}'
            res[name] = statistics.median(times) * 1e3
        best = min(res.values())
        for name, ms in sorted(res.items(), key=lambda x: x[1]):
            print(f'{ts:45s} {name:32s} {ms:9.1f} {ms / best:9.2f}')
        print()


if __name__ == '__main__':
    main()
