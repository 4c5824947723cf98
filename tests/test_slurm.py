"""A real single-node Slurm on loopback runs the tiny chain submitted by `mammo slurm --submit`.

The test installs Debian's slurmctld/slurmd/munge when they are missing (it needs root for that and for the daemons;
elsewhere it is skipped, saying so), starts munged, slurmctld and slurmd in the foreground under its own config,
and stops exactly the processes it started."""
import json, os, re, shutil, signal, subprocess, time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, mammo
from mammo_nb.params import load_params
from mammo_nb.prepare import version_dir, version_name

PKGS = ['slurmctld', 'slurmd', 'slurm-client', 'munge']


def _install():
    if all(shutil.which(x) for x in ('slurmctld', 'slurmd', 'sbatch', 'munged')): return
    env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
    cmd = ['apt-get', 'install', '-y', '-q', '--no-install-recommends', *PKGS]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(['apt-get', 'update', '-q'], env=env, capture_output=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f'could not install Slurm: {r.stderr[-2000:]}'


CONF = """ClusterName=mammotest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldPort={port}
SlurmdPort={port2}
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope='module')
def slurm(tmp_path_factory):
    if os.geteuid() != 0: pytest.skip('the Slurm test needs root (to install Slurm and run its daemons)')
    _install()
    d = tmp_path_factory.mktemp('slurm')
    (d / 'state').mkdir(); (d / 'spool').mkdir()
    conf = d / 'slurm.conf'
    conf.write_text(CONF.format(d=d, port=26817, port2=26818, cpus=os.cpu_count()))
    env = {**os.environ, 'SLURM_CONF': str(conf)}
    Path('/run/munge').mkdir(exist_ok=True); shutil.chown('/run/munge', 'munge', 'munge')
    procs = []
    sock = Path('/run/munge/munge.socket.2')
    if not sock.exists():                                   # a munged already running is used as it is
        procs.append(subprocess.Popen(['runuser', '-u', 'munge', '--', 'munged', '-F'], stdout=subprocess.DEVNULL,
                                      stderr=open(d / 'munged.err', 'w')))
        for _ in range(50):
            if sock.exists(): break
            time.sleep(0.1)
    procs.append(subprocess.Popen(['slurmctld', '-D', '-f', str(conf)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
    procs.append(subprocess.Popen(['slurmd', '-D', '-f', str(conf)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
    try:
        for _ in range(100):
            r = subprocess.run(['sinfo', '-h', '-o', '%T'], env=env, capture_output=True, text=True)
            if r.stdout.strip() == 'idle': break
            time.sleep(0.2)
        else:
            pytest.fail(f"Slurm did not come up: {r.stdout} {r.stderr}\n{(d / 'slurmctld.log').read_text()[-2000:]}")
        yield env
    finally:
        for p in reversed(procs):                            # only what this test started, by pid
            p.send_signal(signal.SIGTERM)
            try: p.wait(10)
            except subprocess.TimeoutExpired: p.kill(); p.wait()


def test_chain_on_real_slurm(slurm, tiny_set, tmp_path):
    os.environ['SLURM_CONF'] = slurm['SLURM_CONF']          # for the `mammo` subprocesses (sbatch)
    try:
        f = tmp_path / 'slurm.yaml'
        f.write_text(yaml.safe_dump({'base': str(ROOT / 'params/tiny.yaml'), 'source': {'root': str(tiny_set)},   # no synth job
                                     'slurm': {'partition': 'debug', 'gpu_partition': 'debug', 'gres': '', 'shards': 2,
                                               'cpus': 1, 'gpu_cpus': 1, 'time': '00:15:00', 'gpu_time': '00:15:00'},
                                     'train': {'epochs': 1},
                                     'explain': {'methods': ['eigencam'], 'max_lesions': 4, 'n_original': 0}}))   # the chain, not the maps
        t0 = time.time()
        r = mammo('slurm', f, '--submit', cwd=tmp_path)
    finally:
        os.environ.pop('SLURM_CONF', None)
    ids = dict(re.findall(r'^(\d\d_\w+): (\d+)$', r.stdout, re.M))
    assert list(ids) == ['10_prepare_shards', '11_prepare_report', '20_train', '40_explain'], r.stdout
    d = Path(re.search(r'scripts: (\S+)', r.stdout).group(1))
    assert '#SBATCH --array=0-1' in (tmp_path / d / '10_prepare_shards.sbatch').read_text()
    # wait for the chain: every job leaves the queue
    deadline = time.time() + 600
    while time.time() < deadline:
        q = subprocess.run(['squeue', '-h', '-o', '%i %T %r', '-j', ','.join(ids.values())], env=slurm, capture_output=True, text=True)
        if not q.stdout.strip(): break
        if 'DependencyNeverSatisfied' in q.stdout: pytest.fail(f'a job failed:\n{q.stdout}\n{_logs(tmp_path / d)}', pytrace=False)
        time.sleep(2)
    else:
        pytest.fail(f'chain did not finish: {q.stdout}')
    secs = time.time() - t0
    p = load_params(f)
    vd = version_dir(p) if version_dir(p).is_absolute() else tmp_path / version_dir(p)
    # both array shards ingested, and the merge used them all
    for i in range(2): assert (vd / '_work' / f'records-{i}of2.jsonl').stat().st_size > 0, _logs(tmp_path / d)
    assert json.loads((vd / 'manifest.json').read_text())['counts']['images'] == 24
    rep = tmp_path / 'reports' / version_name(p)
    runs = [json.loads(x.read_text()) for x in rep.glob('*/run.json')]
    done = {s['stage']: s['status'] for r in runs for s in r['stages']}
    assert done == {'prepare': 'ok', 'train': 'ok', 'explain': 'ok'}, (runs, _logs(tmp_path / d))
    assert (rep / 'index.html').is_file() and len(list(rep.glob('*/20_train.html'))) == 1
    print(f'Slurm chain: {secs:.0f} s')


def _logs(d: Path) -> str:
    return '\n'.join(f'--- {x.name}\n{x.read_text()[-1500:]}' for x in sorted((d / 'logs').glob('*.out')))
