"""`mammo run`: papermill notebook chains, offline HTML reports and the index, skipping, --from, failure semantics."""
import json, re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import ROOT, cli, mammo
from mammo_nb.params import load_params
from mammo_nb.pipeline import external_refs, fingerprint
from mammo_nb.prepare import version_name


class Links(HTMLParser):
    def __init__(self): super().__init__(); self.hrefs = []
    def handle_starttag(self, tag, attrs): self.hrefs += [v for k, v in attrs if k == 'href']


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
    "The tiny recipe run end to end from an empty folder (synth -> prepare -> train -> evaluate), through the CLI."
    cwd = tmp_path_factory.mktemp('chain')
    r = mammo('run', ROOT / 'params/tiny.yaml', cwd=cwd)
    return cwd, cwd / 'reports' / version_name(load_params(ROOT / 'params/tiny.yaml')), r


def test_chain_writes_reports_and_index(chain):
    cwd, vdir, r = chain
    assert 'prepare: ok' in r.stdout and 'train: ok' in r.stdout and 'explain: ok' in r.stdout
    assert 'test all-lesion sens@1FP' in r.stdout
    assert 'IPKernelApp' not in r.stderr and 'WARNING' not in r.stderr            # quiet: one line per stage
    assert [l.split(':')[0] for l in r.stderr.splitlines() if l.startswith('[')] == ['[tiny] prepare', '[tiny] train', '[tiny] explain']
    p = load_params(ROOT / 'params/tiny.yaml')
    synth = cwd / p.synth.out
    assert (synth / 'synth_info.json').is_file() and len(list(synth.rglob('*.dicom'))) == 24
    (run,) = [d for d in vdir.iterdir() if d.is_dir()]
    for f in ('10_prepare.ipynb', '10_prepare.html', '20_train.ipynb', '20_train.html', '40_explain.ipynb',
              '40_explain.html', '10_prepare.log', '20_train.log', '40_explain.log', 'run.json', 'params.json'):
        assert (run / f).is_file(), f
    rec = json.loads((run / 'run.json').read_text())
    assert rec['status'] == 'ok' and rec['version'] == vdir.name and rec['git_commit']
    # the index links every stage report of the run, and the links resolve
    index = (vdir / 'index.html').read_text()
    L = Links(); L.feed(index)
    assert sorted(L.hrefs) == sorted(f'{run.name}/{f}' for f in ('10_prepare.html', '20_train.html', '40_explain.html'))
    assert all((vdir / h).is_file() for h in L.hrefs)
    assert index.count("<img alt='froc_roc.png'") == 1 and 'data:image/png;base64' in index      # the newest run's FROC
    top = (cwd / 'reports' / 'index.html').read_text()                                        # every version, one page
    T = Links(); T.feed(top)
    assert T.hrefs == [f'{vdir.name}/index.html'] and 'tiny.yaml' in top and 'test AP50' in top and external_refs(top) == []
    # reports open offline: no script, stylesheet or image fetched from the network; plots are embedded
    for f in [vdir / 'index.html', *run.glob('*.html')]:
        h = f.read_text()
        assert external_refs(h) == [], (f, external_refs(h))
    train_html = (run / '20_train.html').read_text()
    assert train_html.count('data:image/png;base64') >= 4
    # code folded, not gone: each shown code cell's input inside its own <details> (closed), the .ipynb complete
    nb = json.loads((run / '20_train.ipynb').read_text())
    shown = [c for c in nb['cells'] if c['cell_type'] == 'code' and 'hide-input' not in c['metadata'].get('tags', [])]
    assert train_html.count('<details class="mammo-code">') == len(shown) > 5 and '<details class="mammo-code" open' not in train_html
    # each report records the recipe, package version, git commit and the manifest hash it used
    for f in ('10_prepare.html', '20_train.html'):
        h = (run / f).read_text()
        assert 'manifest sha256' in h and 'git commit' in h and rec['git_commit'] in h and 'package' in h
    assert 'from mammo_nb.pipeline import' not in train_html       # set-up cells are hidden
    # the executed report notebooks hold their tables and figures (the prepare report: counts, figures, the version)
    outs = lambda f: [o for c in json.loads((run / f).read_text())['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', [])]
    prep = outs('10_prepare.ipynb')
    assert sum('image/png' in o.get('data', {}) for o in prep) >= 4 and any(vdir.name in json.dumps(o) for o in prep)
    tr = json.dumps(outs('20_train.ipynb'))
    assert 'image/png' in tr and 'AP50_ultralytics' in tr and 'operating point' in tr


def test_reports_open_with_their_findings(chain, tmp_path):
    """What a reader sees on opening a report in a 1440 x 900 browser window (headless Chromium): the findings block
    near the top, a figure of the prepare report on the first screen, no code shown until opened; `mammo screenshot`
    writes that screen as a PNG."""
    import shutil
    from conftest import chromium
    if chromium() is None: pytest.skip('chromium / chromedriver not installable here (needs root and apt)')
    import cv2
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    cwd, vdir, _ = chain
    run = sorted(d for d in vdir.iterdir() if d.is_dir())[0]                 # the chain's first run
    r = cli('screenshot', run / '10_prepare.html', '--out', tmp_path / 'prepare.png')
    assert r.returncode == 0, r.stderr
    assert cv2.imread(str(tmp_path / 'prepare.png')).shape[:2] == (900, 1440)
    assert cli('screenshot', tmp_path / 'nope.html').returncode == 2
    opts = webdriver.ChromeOptions()
    for a in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--window-size=1440,900'): opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(shutil.which('chromedriver')), options=opts)
    js_top = "const e = document.querySelector(arguments[0]); return e ? e.getBoundingClientRect().top : null"
    try:
        for name, words in (('10_prepare.html', ('Dataset version', 'images per split and role', 'boxes per class and split')),
                            ('20_train.html', ('Detector', 'AP50', 'sens@1FP', 'image ROC-AUC'))):
            drv.get((run / name).as_uri())
            vh = drv.execute_script('return window.innerHeight')
            top = drv.execute_script(js_top, '.mammo-findings')
            assert top is not None and 0 <= top < vh / 2, (name, top, vh)
            block = drv.find_element('css selector', '.mammo-findings').text
            assert all(w in block for w in words + ('manifest sha256', 'git commit')), (name, block)
            assert drv.execute_script("return [...document.querySelectorAll('.jp-CodeCell .jp-InputArea')].every(e => "
                                      "e.closest('details') && !e.closest('details').open && e.innerText === '')"), name  # code folded
            if name == '10_prepare.html':
                fig = drv.execute_script("const t = [...document.images].filter(i => i.naturalWidth > 200)"
                                         ".map(i => i.getBoundingClientRect().top); return t.length ? t[0] : null")
                assert fig is not None and fig < vh, ('first figure at', fig, 'screen', vh)
    finally: drv.quit()


def test_rerun_skips_unchanged_stages(chain):
    cwd, vdir, _ = chain
    r = mammo('run', ROOT / 'params/tiny.yaml', cwd=cwd)
    assert 'prepare: skipped' in r.stdout and 'train: skipped' in r.stdout and 'explain: skipped' in r.stdout
    # a changed setting of the train stage (its evaluation's: the trained run is reused) changes the fingerprint of
    # train and of every stage after it, not of prepare; one of explain's changes only explain's (the failing-stage
    # test below runs such a change)
    state = json.loads((vdir / 'stages.json').read_text())
    for change, changed in (('evaluate: {bootstrap: 20}', {'train', 'explain'}), ('explain: {methods: [eigencam]}', {'explain'})):
        f = cwd / 'more.yaml'
        f.write_text(f"base: {ROOT / 'params/tiny.yaml'}\n{change}\n")
        q = load_params(f)
        assert {s for s in ('prepare', 'train', 'explain') if fingerprint(q, s) != state[s]['fingerprint']} == changed, change


def test_failing_stage_stops_with_a_rendered_error(chain):
    cwd, vdir, _ = chain
    bad = cwd / 'bad.yaml'
    bad.write_text(f"base: {ROOT / 'params/tiny.yaml'}\ntrain: {{model: missing-weights.pt}}\n")
    r = mammo('run', bad, cwd=cwd, check=False)
    assert r.returncode == 2
    assert "stage 'train' failed" in r.stderr and "missing-weights.pt" in r.stderr and '--from train' in r.stderr
    report = Path(cwd) / re.search(r'report: (\S+\.html)', r.stderr).group(1)
    h = report.read_text()
    assert 'TrainError' in h and 'missing-weights.pt' in h and external_refs(h) == []
    rec = json.loads((report.parent / 'run.json').read_text())
    assert rec['status'] == 'failed' and rec['stages'][-1]['stage'] == 'train'      # explain never started
    assert 'failed' in (vdir / 'index.html').read_text()
    # the recipe fixed (and an explain setting changed), resumed from the failed stage: that stage and every one after
    # it run, none before, and the changed setting is applied
    bad.write_text(f"base: {ROOT / 'params/tiny.yaml'}\n"
                   "explain: {methods: [eigencam], max_lesions: 4, n_original: 0}\n")       # resume semantics, not the maps
    r = mammo('run', bad, '--from', 'train', cwd=cwd)
    assert 'prepare' not in r.stdout.split('index:')[0] and 'train: ok' in r.stdout and 'explain: ok' in r.stdout
    (ex,) = cwd.glob('**/runs/*/explain/explain.json')
    assert json.loads(ex.read_text())['methods'] == ['eigencam']
    state = json.loads((vdir / 'stages.json').read_text())
    assert all(state[s]['fingerprint'] == fingerprint(load_params(bad), s) and state[s]['status'] == 'ok' for s in ('train', 'explain'))


def test_unknown_stage_is_a_clear_error(tmp_path):
    r = cli('run', ROOT / 'params/tiny.yaml', '--stages', 'prepare,trian')
    assert r.returncode == 2 and "unknown stage 'trian'" in r.stderr
