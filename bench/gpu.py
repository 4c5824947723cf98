"""The GPU machine's one prepared check: JPEG 2000 decode throughput and training-epoch time with GPU utilisation.

    bash bench/gpu.sh                      # on a GPU node: full preset, params/gpu.yaml, 3 epochs
    bash bench/gpu.sh --tiny RECIPE        # anywhere (CPU): a tiny recipe's version, 1 epoch; what the test runs

1. Decode, JPEG 2000 files only, one image at a time unless said: the CPU full decode (`mammo_nb.ingest.decode`,
   imagecodecs, one thread), the CPU reduced decode at the level long side 1024 needs (Pillow), and, where
   `nvidia.nvimgcodec` and CUDA are present, nvImageCodec's batched GPU decode (pixels checked equal to the CPU
   full decode; copied back to the host, as prepare would need them). Images per second for each.
2. Training: `train_run` of the recipe's first model for a few epochs on its device (`train.device`; the recipe's
   version is built first when missing), seconds per epoch from `results.csv`, and the GPU's utilisation and memory
   sampled every 0.5 s by `nvidia-smi` while it trains (none on a CPU).

Writes `gpu.json` to $OUT (the device tool's folder) or `bench/out/`, and prints a table. Not a test: figures vary
by machine; the test only checks that the script runs and reports on a CPU.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, threading, time
from pathlib import Path

os.environ.setdefault('YOLO_OFFLINE', '1')
import numpy as np
import pydicom

from mammo_nb.ingest import first_frame, decode, j2k_header, reduce_level

ROOT = Path(__file__).resolve().parents[1]


def j2k_files(root: Path, n: int) -> list[Path]:
    "Up to `n` JPEG 2000 DICOMs under `root`, in path order."
    out = []
    for f in sorted(root.rglob('*.dicom')) + sorted(root.rglob('*.dcm')):
        if 'JPEG 2000' in pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID.name: out.append(f)
        if len(out) == n: break
    return out


def gpu_decoder():
    "nvImageCodec's decoder and decode parameters (every bit depth, no colour conversion), or (None, why)."
    try:
        import torch
        if not torch.cuda.is_available(): return None, 'no CUDA device'
        from nvidia import nvimgcodec
        return (nvimgcodec.Decoder(), nvimgcodec.DecodeParams(allow_any_depth=True, color_spec=nvimgcodec.ColorSpec.UNCHANGED)), ''
    except Exception as e: return None, f'{type(e).__name__}: {e}'[:200]


def bench_decode(files: list[Path], batch: int = 8) -> dict:
    ds = [pydicom.dcmread(f) for f in files]
    frames = [first_frame(d) for d in ds]
    rows, ref = {}, []
    t = time.perf_counter()
    for d in ds: ref.append(decode(d)[0])
    rows['cpu full (imagecodecs, 1 thread)'] = len(ds) / (time.perf_counter() - t)
    levels = [reduce_level(j2k_header(fr), 1024) for fr in frames]
    t = time.perf_counter()
    for d, r in zip(ds, levels): decode(d, reduce=r)
    rows[f'cpu reduced for long side 1024 (level {"/".join(map(str, sorted(set(levels))))})'] = len(ds) / (time.perf_counter() - t)
    dec, why = gpu_decoder()
    out = dict(files=len(files), size=list(ref[0].shape) if ref else None, gpu_decode=why or 'nvImageCodec')
    if dec:
        decoder, params = dec
        try:
            decoder.decode(frames[:batch], params=params)                        # warm-up: CUDA context, kernels
            t, got = time.perf_counter(), []
            for i in range(0, len(frames), batch):
                got += [np.asarray(im.cpu()) for im in decoder.decode(frames[i:i + batch], params=params)]
            rows[f'gpu nvImageCodec (batch {batch}, to host)'] = len(ds) / (time.perf_counter() - t)
            out['gpu_equal_to_cpu'] = all(np.array_equal(np.squeeze(g).astype(np.int64) & ((1 << int(d.BitsStored)) - 1),
                                                         r.astype(np.int64) & ((1 << int(d.BitsStored)) - 1)) for g, r, d in zip(got, ref, ds))
        except Exception as e: out['gpu_decode'] = f'failed: {type(e).__name__}: {e}'[:200]
    out['images_per_s'] = {k: round(v, 2) for k, v in rows.items()}
    return out


class GPUSampler(threading.Thread):
    "Samples `nvidia-smi` utilisation (%) and memory (MiB) every `every` seconds until stopped; nothing without it."
    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True); self.every, self.samples, self._halt = every, [], threading.Event()
    def run(self):
        if not shutil.which('nvidia-smi'): return
        while not self._halt.is_set():
            try:
                r = subprocess.run(['nvidia-smi', '--query-gpu=utilization.gpu,memory.used', '--format=csv,noheader,nounits'],
                                   capture_output=True, text=True, timeout=5)
                u, m = r.stdout.splitlines()[0].split(',')
                self.samples.append((float(u), float(m)))
            except Exception: pass
            self._halt.wait(self.every)
    def stop(self) -> dict:
        self._halt.set(); self.join(timeout=10)
        if not self.samples: return dict(gpu_util_pct_mean=None, gpu_util_pct_median=None, gpu_mem_mib_max=None, samples=0)
        u, m = np.array(self.samples).T
        return dict(gpu_util_pct_mean=round(float(u.mean()), 1), gpu_util_pct_median=float(np.median(u)),
                    gpu_mem_mib_max=float(m.max()), samples=len(u))


def bench_train(recipe: Path, epochs: int, overrides: dict) -> dict:
    from mammo_nb.params import load_params
    from mammo_nb.prepare import prepare, version_dir
    from mammo_nb.train import train_run
    from mammo_nb.trainutil import check_version
    p = load_params(recipe, {**overrides, 'train': {'epochs': epochs, 'val_every': epochs, **overrides.get('train', {})}})
    t = time.perf_counter()
    if not (version_dir(p) / 'manifest.json').exists(): prepare(p, progress=False)      # writes the synthetic set first if needed
    prep_s = time.perf_counter() - t
    V = check_version(p)
    model = p.train.model if isinstance(p.train.model, str) else p.train.model[0]
    rd = V.dir / 'runs' / f'bench-gpu-{time.strftime("%Y%m%d-%H%M%S")}'
    sampler = GPUSampler(); sampler.start()
    t = time.perf_counter()
    try: train_run(p, model, V, rd)
    finally: gpu = sampler.stop()
    wall = time.perf_counter() - t
    tj = json.loads((rd / 'train.json').read_text())
    ep = [float(l.split(',')[1]) for l in (rd / 'results.csv').read_text().splitlines()[1:]]
    shutil.rmtree(rd, ignore_errors=True)
    return dict(recipe=str(recipe), version=V.dir.name, model=model, device=tj['device'], imgsz=p.train.imgsz,
                batch=p.train.batch, amp=tj['args'].get('amp'), epochs=len(ep), train_images=int((V.images.split == 'train').sum()),
                s_per_epoch=[round(b - a, 2) for a, b in zip([0.0] + ep, ep)], wall_s=round(wall, 1),
                prepare_s=round(prep_s, 1), cpu=tj.get('cpu'), **gpu)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--tiny', metavar='RECIPE', help='a small recipe on the CPU (1 epoch; its source images for the decode part)')
    ap.add_argument('--epochs', type=int)
    ap.add_argument('--files', type=int, default=40, help='JPEG 2000 files to decode')
    ap.add_argument('--out', default=os.environ.get('OUT') or str(ROOT / 'bench' / 'out'))
    a = ap.parse_args(argv)
    import torch
    info = dict(date=time.strftime('%Y-%m-%d %H:%M'), torch=torch.__version__, cuda=torch.cuda.is_available(),
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, cpu_count=os.cpu_count())
    if a.tiny:
        from mammo_nb.params import load_params
        from mammo_nb.prepare import source_root
        recipe, epochs, ov = Path(a.tiny), a.epochs or 1, {}
        src = source_root(load_params(recipe))
    else:
        n = os.cpu_count() or 1                            # a GPU node's cores write and prepare the version
        recipe, epochs, ov = ROOT / 'params' / 'gpu.yaml', a.epochs or 3, {'synth': {'workers': n}, 'prepare': {'workers': n}}
        src = ROOT / 'data' / 'bench' / 'synth-full'
        if not (src / 'synth_info.json').exists():
            from mammo_nb.synth import synth_dataset
            synth_dataset(src, 'full', 0, os.cpu_count() or 1, progress=False)
    files = j2k_files(src, a.files)
    info['decode'] = bench_decode(files) if files else dict(files=0)
    info['train'] = bench_train(recipe, epochs, ov)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    (out / 'gpu.json').write_text(json.dumps(info, indent=1, default=str) + '\n')
    print(f"{info['date']}  torch {info['torch']}  GPU: {info['gpu'] or 'none (CPU)'}  cores: {info['cpu_count']}")
    d = info['decode']
    print(f"\nJPEG 2000 decode, {d['files']} files {d.get('size')}, GPU decode: {d.get('gpu_decode')}"
          + (f", equal to CPU: {d['gpu_equal_to_cpu']}" if 'gpu_equal_to_cpu' in d else ''))
    for k, v in d.get('images_per_s', {}).items(): print(f'  {k:55s} {v:8.2f} img/s')
    t = info['train']
    print(f"\nTraining {t['model']} on {t['version']} ({t['train_images']} train images), device {t['device']}, imgsz {t['imgsz']}, "
          f"batch {t['batch']}, amp {t['amp']}: s/epoch {t['s_per_epoch']}; GPU utilisation mean {t.get('gpu_util_pct_mean')} %, "
          f"memory max {t.get('gpu_mem_mib_max')} MiB ({t['samples']} samples)")
    print(f"\nwritten: {out / 'gpu.json'}")


if __name__ == '__main__':
    main()
