"""Issue 37's measurement: calcifications found by (a) whole images at 320 px, (b) tiles of 320 px from a 1280-px
version with sliced inference, (c) (b) with the stride-4 (P2) head, on the calcification-rich synthetic set.

    python bench/calc.py [--arms calc calc-tiles calc-tiles-p2] [--out reports/calc.json]

Runs `mammo prepare` once and `mammo train` (training + evaluation) for each arm's recipe in `params/`, one at a time
(two trainings at once on 2 cores slow each other several-fold), then prints one table: per arm and split, Suspicious
Calcification AP50 (COCO) and sensitivity at 1 false positive per image (a mark whose centre is inside the cluster
box: `evaluate.hit`), Mass AP50 and sensitivity, each with its 95% patient-bootstrap interval; training seconds; and
prediction seconds per image, whole image vs sliced, for each arm's weights on the test split.
"""
import argparse, json, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def fmt(d):
    return '-' if not d or d.get('value') is None else f"{d['value']:.2f} ({d['lo']:.2f}-{d['hi']:.2f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--arms', nargs='+', default=['calc', 'calc-tiles', 'calc-tiles-p2'])
    ap.add_argument('--out', default=str(ROOT / 'reports' / 'calc.json'))
    a = ap.parse_args()
    from mammo_nb.evaluate import predict
    from mammo_nb.params import load_params
    from mammo_nb.runs import RunDir, models, run_dir
    from mammo_nb.trainutil import check_version
    t0 = time.time()
    subprocess.run([str(BIN / 'mammo'), 'prepare', str(ROOT / 'params' / f'{a.arms[0]}.yaml'), '--quiet'], check=True, cwd=ROOT)
    rows, out = [], {}
    for arm in a.arms:
        f = ROOT / 'params' / f'{arm}.yaml'
        t = time.time()
        subprocess.run([str(BIN / 'mammo'), 'train', str(f)], check=True, cwd=ROOT)
        p = load_params(f)
        run = RunDir(ROOT / run_dir(p, models(p)[0]))
        m, tj = run.metrics, run.record
        V = check_version(p)
        test = V.images[V.images.split == 'test']
        timing = {}
        for how, sl in (('whole', None), ('sliced', dict(window=320, overlap=0.2, whole=True))):
            s0 = time.time()
            predict(run.best, V, 'test', run.imgsz(p.train.imgsz), p.evaluate.conf, p.evaluate.iou, p.evaluate.max_det,
                    batch=1, progress=False, threads=p.train.threads, slices=sl)
            timing[how] = round((time.time() - s0) / len(test), 3)
        out[arm] = dict(run=run.name, version=m['version'], train_wall_s=tj.get('wall_s'), epochs=tj.get('epochs_done'),
                        s_per_epoch=tj.get('s_per_epoch'), arm_wall_s=round(time.time() - t, 1), predict_s_per_image=timing,
                        inference=m['conventions'].get('inference'), hit=m['conventions'].get('froc_hit_per_class'),
                        splits={sp: dict(per_class={c: m['splits'][sp]['per_class'][c] for c in ('Suspicious Calcification', 'Mass')},
                                         n_images=m['splits'][sp]['n_images']) for sp in m['splits']})
        for sp, d in out[arm]['splits'].items():
            c, k = d['per_class']['Suspicious Calcification'], d['per_class']['Mass']
            rows.append(f"| {arm} | {sp} | {c['n_gt']} | {fmt(c['ap50'])} | {fmt(c['froc'].get('1'))} | {k['n_gt']} | "
                        f"{fmt(k['ap50'])} | {fmt(k['froc'].get('1'))} | {tj.get('wall_s')} | {timing['whole']} / {timing['sliced']} |")
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
    print(f'\ncalcification arms, {time.time() - t0:.0f} s in all; 95% patient-bootstrap intervals\n')
    print('| arm | split | calc clusters | Calc AP50 | Calc sens@1FP | masses | Mass AP50 | Mass sens@1FP | train s | predict s/img whole / sliced |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    print('\n'.join(rows))


if __name__ == '__main__':
    main()
