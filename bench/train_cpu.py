"""Seconds per training epoch on the CPU: torch threads (1 vs every core) x data-loader workers (0, 1, 2).

    python bench/train_cpu.py [RECIPE] [--epochs N] [--workers 0,1,2] [--threads 1,all]

RECIPE defaults to params/demo.yaml; its dataset version is synthesised and prepared first when missing (the
demo's own prepare stage, not timed). Each configuration trains the recipe's model from scratch for N epochs
(default 3) into a scratch run folder `<version>/runs/bench-cpu-t<threads>-w<workers>` through `train_run`
(our MammoTrainer, the recipe's batch, imgsz and augmentation, mosaic kept on as in all but the demo's last
10 epochs), and the time per epoch is the median of
ultralytics' epoch times after the first epoch (which pays for building the loader and warm-up). Prints one table
with the speed-up of each configuration over ultralytics' own CPU defaults here (1 thread on 2 cores, 0 workers).
Not a test: the numbers vary by machine.
"""
import argparse, json, os, shutil, sys, time
from pathlib import Path

import numpy as np


def epoch_times(rd: Path) -> list[float]:
    "Seconds per epoch from ultralytics' results.csv (its `time` column is cumulative)."
    rows = (rd / 'results.csv').read_text().splitlines()[1:]
    return np.diff([0.0] + [float(r.split(',')[1]) for r in rows]).tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('recipe', nargs='?', default='params/demo.yaml')
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--workers', default='0,1,2')
    ap.add_argument('--threads', default='1,all')
    ap.add_argument('--keep', action='store_true', help='keep the scratch run folders')
    a = ap.parse_args()
    os.environ.setdefault('YOLO_OFFLINE', '1')
    from mammo_nb.params import load_params
    from mammo_nb.pipeline import stage_synth
    from mammo_nb.prepare import prepare, version_dir
    from mammo_nb.train import train_run
    from mammo_nb.trainutil import cpu_threads
    p = load_params(a.recipe)
    if not (version_dir(p) / 'manifest.json').exists():
        if p.source.root is None: stage_synth(p)
        prepare(p)
    cores = len(os.sched_getaffinity(0))
    threads = [cores if t == 'all' else int(t) for t in a.threads.split(',')]
    workers = [int(w) for w in a.workers.split(',')]
    rows = []
    for t in threads:
        for w in workers:
            name = f'bench-cpu-t{t}-w{w}'
            q = load_params(a.recipe, {'train': {'threads': t, 'cpu_workers': w, 'epochs': a.epochs, 'run_name': name,
                                                 'evaluate': False, 'resume': False, 'device': 'cpu',
                                                 'close_mosaic': 0}})   # mosaic on throughout: the demo's usual epoch
            rd = version_dir(q) / 'runs' / name
            shutil.rmtree(rd, ignore_errors=True)
            t0 = time.time()
            train_run(q, q.train.model if isinstance(q.train.model, str) else q.train.model[0], rd=rd)
            wall = time.time() - t0
            e = epoch_times(rd)
            cpu = json.loads((rd / 'train.json').read_text()).get('cpu')
            rows.append(dict(threads=t, workers=w, s_epoch=float(np.median(e[1:] or e)), first=e[0], wall=wall, applied=cpu))
            print(f'  threads {t} workers {w}: {rows[-1]["s_epoch"]:.2f} s/epoch (first {e[0]:.1f} s), applied {cpu}', flush=True)
            if not a.keep: shutil.rmtree(rd, ignore_errors=True)
    base = next((r for r in rows if r['threads'] == 1 and r['workers'] == 0), rows[0])
    print(f"\n{a.recipe}: {p.train.model} imgsz {p.train.imgsz} batch {p.train.batch}, {a.epochs} epochs per row, "
          f"{cores} cores, torch {__import__('torch').__version__}")
    print(f"{'threads':>7} {'workers':>7} {'s/epoch':>8} {'speed-up':>8}   (vs 1 thread, 0 workers: ultralytics' CPU default here)")
    for r in rows:
        print(f"{r['threads']:>7} {r['workers']:>7} {r['s_epoch']:>8.2f} {base['s_epoch'] / r['s_epoch']:>7.2f}x")
    best = min(rows, key=lambda r: r['s_epoch'])
    print(f"fastest: threads {best['threads']}, workers {best['workers']}")


if __name__ == '__main__':
    sys.exit(main())
