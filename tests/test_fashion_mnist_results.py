"""The committed Fashion-MNIST results (docs/fashion-mnist.md, from the run files in docs/fashion-mnist/runs):
`reproduce.py fashion-mnist --report` regenerates the same tables from the committed files alone, and the docs
page quotes them unchanged; --export copies what a report reads and no checkpoint; the claims' gains pair
the seeds and take the paper's direction."""
import os
import shutil

import pytest

import reproduce
import results
from utils import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join('docs', 'fashion-mnist', 'runs')          # as the report names it (run from the root)
PAGE = os.path.join(ROOT, 'docs', 'fashion-mnist.md')
BEGIN, END = '<!-- the tables: made by reproduce.py, do not edit -->', '<!-- end of the tables -->'


def regenerate(tmp_path, capsys):
    """The report of a copy of the committed runs, with the copy's path written as the committed folder's."""
    copy = tmp_path / 'runs'
    shutil.copytree(os.path.join(ROOT, COMMITTED), copy, ignore=shutil.ignore_patterns('results.md', 'curves.png'))
    reproduce.main(['fashion-mnist', '--report', '--runs', str(copy)])
    capsys.readouterr()
    return (copy / 'results.md').read_text().replace(str(copy), COMMITTED), copy


def test_the_committed_tables_are_regenerated_from_the_committed_run_files(tmp_path, capsys):
    text, copy = regenerate(tmp_path, capsys)
    with open(os.path.join(ROOT, COMMITTED, 'results.md')) as f:
        assert text == f.read(), 'docs/fashion-mnist/runs/results.md is not what its run files give: regenerate it'
    assert (copy / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert os.path.isfile(os.path.join(ROOT, COMMITTED, 'curves.png'))
    # every run of the tables is committed and finished, and only the files a report reads
    exp = results.EXPERIMENTS['fashion-mnist']
    for setting in exp['settings']:
        for seed in exp['seeds']:
            folder = os.path.join(ROOT, COMMITTED, setting, f'seed{seed}')
            if os.path.isdir(folder):
                assert set(os.listdir(folder)) <= set(reproduce.EXPORTED), folder


def test_the_docs_page_quotes_the_tables_unchanged(tmp_path, capsys):
    text, _ = regenerate(tmp_path, capsys)
    with open(PAGE) as f:
        page = f.read()
    assert page.count(BEGIN) == 1 and page.count(END) == 1
    quoted = page.split(BEGIN)[1].split(END)[0].strip()
    tables = text.split('\n## Every setting')[0].split('\n\n', 3)[3].strip()     # after the title and the two lines
    assert quoted == tables, 'docs/fashion-mnist.md does not quote the regenerated tables: copy them again'


def test_export_copies_what_the_report_reads_and_no_checkpoint(tmp_path, capsys):
    source = tmp_path / 'runs'
    shutil.copytree(os.path.join(ROOT, COMMITTED), source)
    first = next(p for p in sorted(source.glob('*/seed*')) if (p / 'finished.json').is_file())
    (first / 'checkpoint.pt').write_bytes(b'not to be copied')
    (first / 'best.pt').write_bytes(b'not to be copied')
    unfinished = source / first.parent.name / 'seed7'
    unfinished.mkdir()
    (unfinished / 'config.json').write_text('{}')
    reproduce.main(['fashion-mnist', '--report', '--runs', str(source), '--seeds', '0,1,2,7',
                    '--export', str(tmp_path / 'out')])
    assert 'copied the files of' in capsys.readouterr().out
    out = tmp_path / 'out'
    assert sorted(os.listdir(out / first.parent.name / first.name)) == sorted(
        n for n in reproduce.EXPORTED if (first / n).is_file())
    assert os.listdir(out / first.parent.name / 'seed7') == ['config.json']     # counted as not finished
    assert 'started but not finished, not counted' in (out / 'results.md').read_text()
    assert (out / 'results.md').is_file() and (out / 'experiment.json').is_file()


@pytest.mark.parametrize('case', ['no-report', 'foreign-folder'])
def test_export_refuses_without_report_or_into_a_foreign_folder(case, tmp_path, capsys):
    source, foreign = tmp_path / 'runs', tmp_path / 'foreign'
    shutil.copytree(os.path.join(ROOT, COMMITTED), source)
    foreign.mkdir()
    (foreign / 'mine.txt').write_text('keep')
    args = ['--runs', str(source), '--export', str(foreign)] + (['--report'] if case == 'foreign-folder' else [])
    with pytest.raises(SystemExit) as e:
        run_main(reproduce.main, ['fashion-mnist', *args])
    message = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message.startswith('error: ') and '\n' not in message
    assert ('give --report as well' if case == 'no-report' else 'not an export of') in message
    assert os.listdir(foreign) == ['mine.txt']


def single_run(seed, accuracy):
    return {'script': 'model_vgg_single', 'cfg': {'seed': seed}, 'path': f'seed{seed}',
            'rows': [{'epoch': e, 'test_acc': accuracy} for e in range(6)]}


def test_claims_pair_the_seeds_and_take_the_papers_direction():
    part = dict(measure='error', table={'row': {'A': ('a', 'test_acc'), 'B': ('b', 'test_acc')}},
                claims=[('A', 'B', 'below')])
    done = {'a': [single_run(0, 0.80), single_run(1, 0.70), single_run(2, 0.90)],   # seed 2 only in A: left out
            'b': [single_run(1, 0.72), single_run(0, 0.75)]}
    line = results.claims_text(part, done, False).splitlines()[2]
    # seed 0: +5 points, seed 1: -2 points (accuracy gained = error lost): mean +1.50, std 4.95, 1 of 2 the paper's way
    assert line == '| A below B | +1.50 ± 4.95 | 1 of 2 | yes |'
    done['a'][0] = single_run(0, 0.72)
    assert results.claims_text(part, done, False).splitlines()[2] == '| A below B | -2.50 ± 0.71 | 0 of 2 | no |'


def test_readme_quotes_the_committed_claims_unchanged():
    with open(os.path.join(ROOT, 'README.md')) as f:
        readme = f.read()
    begin, end = '<!-- quoted unchanged from docs/fashion-mnist/runs/results.md -->', '<!-- end of the quote -->'
    rows = readme.split(begin)[1].split(end)[0].strip().splitlines()[2:]
    with open(os.path.join(ROOT, COMMITTED, 'results.md')) as f:
        lines = set(f.read().splitlines())
    assert len(rows) >= 5
    for row in rows:
        assert row in lines, f'README quotes a row that docs/fashion-mnist/runs/results.md does not hold: {row}'
