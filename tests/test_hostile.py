"""Hostile input, third round (issue 46): special files in a source folder and as recipe files, recipe values that
would leave their roots, and YAML bombs. Each ends as a failure row with its reason or a one-line error naming the
file or key, exit 2: no hang, no traceback, nothing written outside the recipe's folders."""
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, cli


def mias_folder(d: Path) -> Path:
    "A mini-MIAS-layout folder of two drawn breasts and a named pipe where a third image should be."
    d.mkdir(parents=True)
    yy, xx = np.mgrid[0:256, 0:256]
    for k in (1, 2):
        img = np.where((xx / 200) ** 2 + ((yy - 128) / 120) ** 2 < 1, 120 + 20 * np.sin(xx / 7 + k), 0).astype(np.uint8)
        cv2.imwrite(str(d / f'mdb00{k}.pgm'), img)
    os.mkfifo(d / 'mdb003.pgm')
    (d / 'Info.txt').write_text('mdb001 F CIRC B 60 128 10\nmdb002 F NORM\nmdb003 F NORM\nmdb004 F NORM\n')
    return d


def recipe(tmp: Path, **kw) -> Path:
    d = {'base': str(ROOT / 'params' / 'tiny.yaml'), 'name': 'h', 'source': {'layout': 'mias', 'root': str(tmp / 'raw')},
         'prepare': {'out': str(tmp / 'versions'), 'workers': 1, 'pseudonym_key': str(tmp / 'key')}, 'split': {'test_frac': 0.0, 'val_frac': 0.0}}
    for k, v in kw.items(): d.setdefault(k, {}).update(v) if isinstance(v, dict) else d.__setitem__(k, v)
    f = tmp / 'h.yaml'
    f.write_text(yaml.safe_dump(d))
    return f


def test_pipe_among_the_images_is_a_failure_row(tmp_path):
    "A FIFO named like an image is recorded `not_a_regular_file` (never opened: opening it would block forever)."
    mias_folder(tmp_path / 'raw')
    r = cli('prepare', recipe(tmp_path), '--quiet')
    assert r.returncode == 0, r.stderr
    v = next((tmp_path / 'versions').glob('h-*'))
    f = pd.read_csv(v / 'failures.csv', dtype=str).fillna('')
    assert f.set_index('image_id').reason.to_dict().get('mdb003') == 'not_a_regular_file', f
    assert 'missing_file' in set(f.reason)                       # mdb004 has no file at all
    assert len(pd.read_csv(v / 'images.csv')) == 2


def test_device_as_annotation_table_is_refused(tmp_path):
    "An annotation table that is a link to /dev/zero is refused before a byte is read: one line, exit 2."
    raw = mias_folder(tmp_path / 'raw')
    (raw / 'Info.txt').unlink(); (raw / 'Info.txt').symlink_to('/dev/zero')
    r = cli('prepare', recipe(tmp_path), '--quiet')
    assert r.returncode == 2 and 'Traceback' not in r.stderr and 'not a regular file' in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize('bad, key', [({'name': '../../x'}, "'name'"), ({'name': '/tmp/abs'}, "'name'"),
                                      ({'name': 'javascript:alert(1)'}, "'name'"),
                                      ({'train': {'run_name': '../../../../x'}}, "'train.run_name'"),
                                      ({'source': {'layout': 'csv', 'csv': '../../../../etc/passwd'}}, "'source.csv'"),
                                      ({'train': {'epochs': 10 ** 12}}, "'train.epochs'"),
                                      ({'clahe': {'long_side': 40000}}, "'clahe.long_side'"),
                                      ({'prepare': {'workers': 4096}}, "'prepare.workers'")])
def test_recipe_values_refused_naming_the_key(tmp_path, bad, key):
    mias_folder(tmp_path / 'raw')
    r = cli('prepare', recipe(tmp_path, **bad), '--quiet')
    assert r.returncode == 2 and key in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not (tmp_path / 'versions').exists() and not (tmp_path.parent / 'x').exists()


@pytest.mark.parametrize('base', ['pipe', 'dir', '/dev/zero', 'bin', 'laughs', 'deep'])
def test_hostile_base_files(tmp_path, base):
    "A `base:` that is a pipe, a folder, a device, a binary file, an alias bomb or 5,000-deep YAML: a one-line error."
    os.mkfifo(tmp_path / 'pipe'); (tmp_path / 'dir').mkdir(); (tmp_path / 'bin').write_bytes(bytes(range(256)) * 64)
    (tmp_path / 'laughs').write_text('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' +
                                     ''.join(f'{c}: &{c} [{",".join(["*" + p] * 9)}]\n' for p, c in zip('abcdefgh', 'bcdefghi')) + 'name: *i\n')
    (tmp_path / 'deep').write_text('name: x\nevaluate: {hit: ' + '[' * 5000 + ']' * 5000 + '}\n')
    f = tmp_path / 'r.yaml'
    f.write_text(f'base: {base}\nname: r\n')
    r = cli('prepare', f, '--dry-run')
    assert r.returncode == 2 and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_link_loop_among_the_images_is_a_failure_row(tmp_path):
    "An image path that is a symlink loop: a failure row with a reason, the other images built, no traceback."
    raw = mias_folder(tmp_path / 'raw')
    (raw / 'mdb004.pgm').symlink_to(raw / 'mdb005.pgm'); (raw / 'mdb005.pgm').symlink_to(raw / 'mdb004.pgm')
    r = cli('prepare', recipe(tmp_path), '--quiet')
    assert r.returncode == 0 and 'Traceback' not in r.stderr, r.stderr
    f = pd.read_csv(next((tmp_path / 'versions').glob('h-*')) / 'failures.csv', dtype=str).fillna('')
    assert f.set_index('image_id').reason.to_dict().get('mdb004') in ('unreadable', 'path_outside_root', 'missing_file'), f


def test_control_characters_never_reach_the_terminal(tmp_path):
    "A recipe path holding a terminal escape: the error line shows it as \\x1b, never the raw byte."
    f = tmp_path / 'bad\x1b[31m.yaml'
    f.write_text('name: x\nsynth: {preset: huge}\n')
    r = cli('prepare', f, '--dry-run')
    assert r.returncode == 2 and '\x1b' not in r.stderr and '\\x1b' in r.stderr, repr(r.stderr)
