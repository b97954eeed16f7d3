"""Every command in README.md and docs/ names a script of this repository and flags that script accepts,
with values of the right type and among its choices: each line is parsed by the script's own argument
parser (its main() is entered and stopped right after parsing, so nothing runs). Lines with shell
variables are left out. A renamed or removed flag fails here."""
import argparse
import glob
import importlib
import importlib.util
import inspect
import os
import re
import shlex
import sys

import pytest

from conftest import ROOT

DOCS = [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
LAUNCHER = re.compile(r'(?:^|\s)(?:\.venv/bin/)?(?:python3?|torchrun)\s')


class Parsed(Exception):
    pass


def commands():
    """(file, line number, script, argv) of every command line that runs a .py file of this repository."""
    found = []
    for path in DOCS:
        with open(path) as f:
            lines = f.read().split('\n')
        k = 0
        while k < len(lines):
            start, text = k, lines[k]
            while text.endswith('\\') and k + 1 < len(lines):
                k += 1
                text = text[:-1] + ' ' + lines[k].strip()
            k += 1
            # a code line whole; in prose, each `inline code` span
            for text in (re.findall(r'`([^`]+)`', text) if '`' in text else [text.strip()]):
                if not LAUNCHER.search(' ' + text) or '$' in text or '<' in text:
                    continue
                try:
                    words = shlex.split(text, comments=True)
                except ValueError:
                    continue
                scripts = [i for i, w in enumerate(words) if w.endswith('.py')
                           and os.path.isfile(os.path.join(ROOT, w))]
                module = words[words.index('-m') + 1] if '-m' in words[:scripts[0] if scripts else 0] else None
                if scripts and re.search(r'(python3?|torchrun)$', words[0]) and module in (None, 'torch.distributed.launch'):
                    i = scripts[0]
                    found.append((os.path.relpath(path, ROOT), start + 1, words[i], words[i + 1:]))
    return found


COMMANDS = commands()


def test_the_docs_have_commands_of_every_script():
    scripts = {c[2] for c in COMMANDS}
    assert {'model_vgg_single.py', 'model_vgg_human.py', 'model_vgg_maxl.py', 'train_sla.py', 'train_meta_semi.py',
            'create_dataset.py', 'results.py', 'plot_features.py', 'benchmarks/bench.py'} <= scripts, scripts


@pytest.mark.parametrize('where,line,script,argv', COMMANDS, ids=[f'{c[0]}:{c[1]}' for c in COMMANDS])
def test_a_documented_command_parses(where, line, script, argv, monkeypatch):
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)               # exits 2 (SystemExit) on an unknown flag or a bad value
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', parse_then_stop)
    monkeypatch.setattr(sys, 'argv', [script] + argv)
    name = script[:-3].replace('/', '.')
    if '/' in script:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(name)
    with pytest.raises(Parsed):
        try:
            module.main(argv) if inspect.signature(module.main).parameters else module.main()
        except SystemExit as e:
            pytest.fail(f'{where}:{line}: {script} {" ".join(argv)} does not parse (exit {e.code})')
