"""Packaging reads settings.ini, nbdev's single source of metadata (pyproject.toml marks these fields dynamic)."""
from configparser import ConfigParser
from pathlib import Path
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']

setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], description=cfg['description'],
    keywords=cfg['keywords'].split(), author=cfg['author'], author_email=cfg['author_email'], license=cfg['license'],
    long_description=Path('README.md').read_text(encoding='utf-8') if Path('README.md').exists() else '',
    long_description_content_type='text/markdown', url=cfg['git_url'], project_urls={'Source': cfg['git_url']},
    classifiers=['Programming Language :: Python :: 3', 'Topic :: Scientific/Engineering :: Medical Science Apps.'],
    python_requires='>=' + cfg['min_python'], packages=setuptools.find_packages(include=['mammo_nb', 'mammo_nb.*']),
    include_package_data=True, install_requires=cfg.get('requirements', '').split(), extras_require={},
    entry_points={'console_scripts': cfg.get('console_scripts', '').split(),
                  'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False)
