"""Learning choices measured on REAL mammograms: the development half of mini-MIAS (`../shared/data/mias-dev`, 162
scanned-film MLO images of 81 women; research licence: read from there, never copied). Not a test: ~1-2 h on 2 cores.

    python bench/real.py                 # everything below, tables to stdout and bench/out/real.md
    python bench/real.py --only arms     # the arms of params/mias-dev-arms.yaml (same 5 patient folds)
    python bench/real.py --only nested   # does a detector trained on other real women help? (the two halves)

`arms`: `mammo cv params/mias-dev-arms.yaml` (every arm on the same folds, pooled out-of-fold, 95% patient bootstrap),
plus test-time flip on the ranked-first arm's fold models (the same models, scored again with `evaluate.tta: flip`).
`nested`: the 81 women dealt into two disjoint halves (`source.subset`); a detector is trained on one half
(`mammo pretrain`, `pretrain.method: supervised`) and the other half's 5-fold CV compares the synthetic start with
it, both directions. Finished folds and pretrainings are reused (delete `data/versions/mias-dev-*` to rerun)."""
import argparse, copy, json, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEV = ROOT / '../shared/data/mias-dev'
OUT = ROOT / 'bench' / 'out'


def ci(d):
    return '-' if not d or d.get('value') is None else (f"{d['value']:.2f}" if d.get('lo') is None else f"{d['value']:.2f} ({d['lo']:.2f}-{d['hi']:.2f})")


def row(label, cv, wall=None):
    "One arm's figures: Mass AP50, Mass sensitivity at 0.5/1/2 FP/image, all-lesion sens@1FP, image ROC-AUC, test ensemble."
    o = cv['splits']['oof']
    m, al = o['per_class'].get('Mass', {}), o.get('all_lesions', {})
    fr = m.get('froc', {})
    ens = (cv['splits'].get('test: ensemble') or {}).get('per_class', {}).get('Mass', {}).get('froc', {}).get('1')
    train_s = sum((r.get('train_s') or 0) for r in cv.get('fold_rows', []))
    return (f"| {label} | {ci(m.get('ap50'))} | {ci(fr.get('0.5'))} | {ci(fr.get('1'))} | {ci(fr.get('2'))} | "
            f"{ci(al.get('froc', {}).get('1'))} | {ci(o.get('image', {}).get('roc_auc'))} | {ci(ens)} | {train_s:.0f} |")


HEAD = ('| arm | Mass AP50 | Mass sens@0.5FP | Mass sens@1FP | Mass sens@2FP | all-lesion sens@1FP | image ROC-AUC | '
        'test ensemble Mass sens@1FP | train s (5 folds) |\n|---|---|---|---|---|---|---|---|---|')


def prepared(p):
    "The recipe's version, prepared when missing (an existing one is used as it is: its folds and runs stay valid)."
    from mammo_nb.prepare import prepare, version_dir
    if not (version_dir(p) / 'manifest.json').exists(): prepare(p, progress=False)


def arms_table(out):
    from mammo_nb.params import load_params
    from mammo_nb.cv import cross_validate, rank_arms, arms as arm_list
    p = load_params(ROOT / 'params/mias-dev-arms.yaml')
    prepared(p)
    cvs = cross_validate(p)
    order = rank_arms(cvs, p.cv.select)
    lines = [f'### Arms on the real development half (pooled out-of-fold, {cvs[order[0]]["splits"]["oof"]["n_images"]} images; '
             f'ranked by Mass sensitivity at 1 FP/image)', '', HEAD] + [row(a, cvs[a]) for a in order]
    best = order[0]                                       # test-time flip on the ranked-first arm's own fold models
    from mammo_nb.cv import pool_folds, fold_run, folds_table
    from mammo_nb.trainutil import check_version
    q, m = arm_list(p)[best]
    flip = copy.deepcopy(q); flip.evaluate.tta = 'flip'
    V = check_version(q); t = folds_table(q, V)
    res = {}
    for r in (flip, q):           # the same trained fold models scored with the flip, then as the arm is (its files restored)
        for k in range(q.split.folds): fold_run(r, m, k, V, t, progress=False)
        res[r is flip] = pool_folds(r, m, V, t, progress=False)
    lines.append(row(f'{best} + test-time flip (same models)', res[True]))
    out.append('\n'.join(lines))


def nested(out):
    from mammo_nb.params import load_params
    from mammo_nb.pretrain import pretrain
    from mammo_nb.cv import cross_validate, rank_arms
    lines = ['### Trained on one half of the women, fine-tuned on the other (pooled out-of-fold on the other half)', '', HEAD]
    for a, b in ((0, 1), (1, 0)):
        pa = load_params(ROOT / f'params/mias-dev-half{a}.yaml')
        prepared(pa)
        t0 = time.time()
        rd = pretrain(pa, progress=False)[0]
        w = next((rd / 'weights').glob(f'*-mias-dev-half{a}.pt'))            # exported beside best.pt
        arm = {'train': {'model': str(w.relative_to(ROOT)) if w.is_relative_to(ROOT) else str(w), 'epochs': 30}}
        pb = load_params(ROOT / f'params/mias-dev-half{b}.yaml', {'cv': {'arms': {'real-other-half': arm}}})
        prepared(pb)
        cvs = cross_validate(pb)
        for k in rank_arms(cvs, 'Mass'): lines.append(row(f'half {b}: {k}' + (f' (pretrained on half {a}, {time.time() - t0:.0f} s)' if k != 'synthetic' else ''), cvs[k]))
    out.append('\n'.join(lines))


def views_table(out, arm: str | None = None):
    """Single view vs bilateral re-scoring (`mammo_nb.views`) of one arm's pooled out-of-fold candidates (default: the
    ranked-first arm of arms.json): the same candidates, re-scored fold by fold by a model fitted on the other folds."""
    from mammo_nb.params import load_params
    from mammo_nb.cv import arms as arm_list, cv_root
    from mammo_nb.metrics import score_predictions
    from mammo_nb.runs import run_name
    from mammo_nb.trainutil import check_version
    from mammo_nb.views import view_scores
    import pandas as pd
    p = load_params(ROOT / 'params/mias-dev-arms.yaml')
    root = cv_root(p)
    arm = arm or json.loads((root / 'arms.json').read_text())['ranked'][0]
    q, m = arm_list(p)[arm]
    V, e = check_version(q), q.evaluate
    oof = pd.read_csv(root / run_name(q, m) / 'oof-predictions.csv', dtype={'image_id': str})
    folds = pd.read_csv(root / 'folds.csv', dtype={'image_id': str})
    lines = [f'### Views: the candidates of arm {arm} re-scored (pooled out-of-fold, real development half; MLO pairs, so bilateral only)', '',
             '| scoring | Mass sens@0.5FP | Mass sens@1FP | Mass FP/img at sens 0.7 | Mass FP/img at sens 0.8 | all-lesion FP/img at sens 0.8 | '
             'breast ROC-AUC | exam ROC-AUC |', '|---|---|---|---|---|---|---|---|']
    for views in ('none', 'bilateral'):
        pred, _, rec = view_scores(oof, folds, V, views, hit_iou=e.hit_iou, seed=e.seed)
        s = score_predictions(pred, V, split=['train', 'val'], hit_iou=e.hit_iou, pooled_nms_iou=e.pooled_nms_iou, max_det=e.max_det,
                              n_boot=e.bootstrap, seed=e.seed, ci=e.ci, hit=e.hit, second_mark=e.second_mark)['splits']['train+val']
        mm, al = s['per_class']['Mass'], s['all_lesions']
        lines.append(f"| {'single view' if views == 'none' else views} | {ci(mm['froc']['0.5'])} | {ci(mm['froc']['1'])} | "
                     f"{ci(mm['fpi_at_sensitivity']['0.7'])} | {ci(mm['fpi_at_sensitivity']['0.8'])} | {ci(al['fpi_at_sensitivity']['0.8'])} | "
                     f"{ci(s['breast']['roc_auc'])} | {ci(s['exam']['roc_auc'])} |")
        if views != 'none': lines.append(f"\ncoefficients per held-out fold (logit own score, partner score, partner present, intercept): {rec['folds']}")
    out.append('\n'.join(lines))


def nested_pooled(out):
    """Both halves' out-of-fold predictions pooled per start and scored on the whole development version: all 162
    images, each predicted by a model that never saw it and whose pretraining (the other half) never saw it either."""
    import pandas as pd
    from mammo_nb.params import load_params
    from mammo_nb.cv import cv_root, arms as arm_list
    from mammo_nb.metrics import score_predictions
    from mammo_nb.runs import run_name
    from mammo_nb.trainutil import check_version
    full = load_params(ROOT / 'params/mias-dev.yaml')
    prepared(full)
    V, e = check_version(full), full.evaluate
    preds = {}
    for b in (0, 1):
        pb = load_params(ROOT / f'params/mias-dev-half{b}.yaml')
        root = cv_root(pb)
        for label, js in json.loads((root / 'arms.json').read_text())['arms'].items() if (root / 'arms.json').exists() else ():
            run = js.get('run') if isinstance(js, dict) else None
            f = root / run / 'oof-predictions.csv' if run else None
            if f is not None and f.exists(): preds.setdefault(label, []).append(pd.read_csv(f, dtype={'image_id': str}))
    lines = ['### Both halves pooled: every development image predicted by a model that never saw it (162 images, 81 women)', '', HEAD]
    for label, ps in preds.items():
        if len(ps) != 2: continue
        s = score_predictions(pd.concat(ps, ignore_index=True), V, split=['train', 'val', 'test'], hit_iou=e.hit_iou,
                              pooled_nms_iou=e.pooled_nms_iou, max_det=e.max_det, n_boot=e.bootstrap, seed=e.seed, ci=e.ci,
                              hit=e.hit, second_mark=e.second_mark)
        lines.append(row(f'{label} (both halves)', dict(splits={'oof': s['splits']['train+val+test']}, fold_rows=[])))
    out.append('\n'.join(lines))


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--only', choices=['arms', 'nested', 'views', 'pooled'])
    ap.add_argument('--arm', help='views: the arm whose candidates are re-scored (default: the ranked-first)')
    a = ap.parse_args()
    if not (DEV / 'Info.txt').is_file(): sys.exit(f'bench/real.py: the real development set is not at {DEV.resolve()}')
    import os; os.chdir(ROOT)
    out = []
    if a.only in (None, 'nested'): nested(out)
    if a.only in (None, 'nested', 'pooled'): nested_pooled(out)
    if a.only in (None, 'arms'): arms_table(out)
    if a.only in (None, 'views'): views_table(out, a.arm)
    OUT.mkdir(parents=True, exist_ok=True)
    text = '\n\n'.join(out) + '\n'
    (OUT / 'real.md').write_text(text)
    print(text)
