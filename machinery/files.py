"""Files: what the data files and the run skeleton both read and write, below both of them.

  atomic_write, atomic_write_text   a file written whole or not at all; a failed write is a UserError with
  write_error                       the OS's words, the bytes needed and advice that fits the run's state
                                    (checkpoints, utils.RunLog)
  read_metrics                      a run's metrics.csv, tolerant: whole rows, and the lines it skipped and why
                                    (utils.RunLog's repair on resume, results.py)
  write_lines, write_indices        the lists a run keeps in its folder (splits, classes, auxiliary labels:
                                    utils.Run.keep_lists)
  md5sum                            the md5 of a data file, or of the bytes a gzip file holds (remembered per
                                    path, size and time) (create_dataset)
  safe_unpickle                     a CIFAR pickle (official or stand-in) read with an unpickler that allows
                                    only what those files hold (create_dataset)
  dataset_root, SYNTHETIC_DIR       where the official files and the synthetic stand-ins lie under a data root
                                    (create_dataset, large_datasets, reproduce.py)
  CHECKPOINT, BEST                  the checkpoint files of a run folder (checkpoints, utils)
  hold_folder, release_folders      one writer per folder: a run folder (utils.Run) or a runs folder
                                    (reproduce.py) locked for its writer's life

Plain Python and numpy; nothing here imports torch.
"""
import csv
import fcntl
import gzip
import hashlib
import json
import os
import pickle
import shlex
import socket

import numpy as np

from .options import UserError, python_command

CHECKPOINT, BEST = 'checkpoint.pt', 'best.pt'      # in every run folder: the latest state, the best networks
SYNTHETIC_DIR = 'synthetic'          # the stand-ins live in <root>/synthetic/, never over real data


LOCK = 'lock'          # in a run folder (and a runs folder): who writes it now, locked by that process


_HELD = {}              # folder (real path) -> the open lock file this process holds it by


def hold_folder(folder, what, advice):
    """Make this process the one writer of `folder` for as long as it lives: an exclusive flock on
    <folder>/lock, which the kernel releases when the process ends however it ends (SIGKILL too), with
    'pid host' written in the file for the message of the next one. A folder another live process holds is
    refused (a UserError naming that process; `what` names the folder's kind, `advice` what to do instead).
    Returns a note when the file named a process that ended without releasing it (killed), or None. The
    file is emptied on release (release_folders), so a note means that previous writer was cut off."""
    key = os.path.realpath(folder)
    if key in _HELD:                          # this process again (a script's main called twice in one process)
        release_folders(key)
    path = os.path.join(folder, LOCK)
    try:
        f = open(path, 'a+')
    except OSError as e:
        raise write_error(path, e) from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().split() or ['?', '?']
        f.close()
        pid, host = (holder + ['?'])[:2]
        raise UserError(f'{folder} is in use: {what} is being written by process {pid} on {host} (it holds '
                        f'{path}). One process writes a folder at a time: wait for that one to end, or stop it '
                        f'(kill {pid} on {host}), then {advice}. Nothing was written.') from None
    f.seek(0)
    before = f.read().split()
    f.seek(0)
    f.truncate()
    f.write(f'{os.getpid()} {socket.gethostname()}\n')
    f.flush()
    _HELD[key] = f
    if before[:2] and before[:2] != [str(os.getpid()), socket.gethostname()]:
        return (f'note: took {path} over from process {before[0]} on {before[1] if len(before) > 1 else "?"}, '
                'which ended without releasing it (killed or cut off)')
    return None


def release_folders(*keys):
    """Release the folders this process holds (`keys`: their real paths; none: every one): each lock file
    emptied, then unlocked and closed."""
    for key in keys or list(_HELD):
        f = _HELD.pop(key, None)
        if f is not None:
            try:
                f.seek(0)
                f.truncate()
            finally:
                f.close()


def write_error(path, e, size=None):
    """The UserError of a failed write of `path` (a file of a run folder): the OS's words for errno (No space
    left on device, ...), the bytes it needed when known, and advice that fits the run's state: continue
    with --resume where a checkpoint exists, else start again."""
    import errno as errnos
    import shutil
    code = e.errno
    words = e.strerror or (os.strerror(code) if code else str(e))
    folder = os.path.dirname(os.path.abspath(path))
    detail = f'errno {code}'
    if size is not None:
        detail += f'; {size:,} bytes to write'
        try:
            free = shutil.disk_usage(folder).free
            if free < size:
                detail += f', {free:,} free there'
        except OSError:
            pass
    if code in (errnos.ENOSPC, errnos.EDQUOT, errnos.EFBIG):
        fix = f'Free space for {folder} (or raise the limit on file size or disk quota)'
    elif code in (errnos.EACCES, errnos.EPERM, errnos.EROFS):
        fix = f'Make {folder} writable'
    else:
        fix = f'Fix what keeps {folder} from being written'
    if os.path.isfile(os.path.join(folder, CHECKPOINT)):
        try:
            with open(os.path.join(folder, 'config.json')) as f:
                script = json.load(f)['script']
        except (OSError, ValueError, KeyError, TypeError):
            script = '<script>'
        then = ('then continue from the last checkpoint with '
                + shlex.join([python_command(), f'{script}.py', '--resume', folder]))
    else:
        then = ('then start the run again: no checkpoint was written yet, so there is nothing to resume (the '
                f'folder {folder} holds only what this attempt wrote before)')
    return UserError(f'cannot write {path}: {words} ({detail}). The previous file, if any, is unchanged and no '
                     f'partial file is left. {fix}, {then}.')


def atomic_write(path, data):
    """`data` (bytes, or a function returning them) into a temporary file, flushed and fsynced, renamed over
    `path`, the folder fsynced: readers see the old or the new file, never half of one, also after a power
    cut. On an OSError (disk full, permissions, read-only filesystem) the temporary file is removed, the old
    file is untouched, and a UserError names the path, the OS's words for the cause and the bytes needed."""
    tmp, size = path + '.tmp', None
    try:
        if callable(data):
            data = data()
        size = len(data)
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except BaseException as e:               # also Ctrl-C: never leave a half-written temporary file
        if os.path.lexists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e, size) from None
        raise


def atomic_write_text(path, text):
    atomic_write(path, text.encode())


def read_metrics(path):
    """metrics.csv read the way it is written, a whole line a row: (its columns, its rows as dicts of text, the
    lines skipped as [(line number, why)]). A line cut part way (the last one, without its end of line: a
    copy or disk cut short), one with another number of fields than the header, or one whose first column
    (the position) is not a number is skipped and named; a missing file is ([], [], [])."""
    try:
        with open(path, newline='') as f:
            lines = f.read().splitlines(keepends=True)
    except FileNotFoundError:
        return [], [], []
    except (OSError, UnicodeDecodeError) as e:
        return [], [], [(1, f'the file cannot be read ({getattr(e, "strerror", None) or e})')]
    if not lines or not lines[0].endswith('\n'):
        return [], [], [(1, 'the header is cut part way')] if lines else []
    header, rows, skipped = next(csv.reader(lines[:1])), [], []
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        values = next(csv.reader([line]))
        if not line.endswith('\n'):
            why = 'cut part way: the file ends inside it'
        elif len(values) != len(header):
            why = f'{len(values)} fields, not the header\'s {len(header)}'
        else:
            try:
                float(values[0])
                why = None
            except ValueError:
                why = f'its {header[0]} is not a number ({values[0][:40]!r})'
        if why:
            skipped.append((number, why))
        else:
            rows.append(dict(zip(header, values)))
    return header, rows, skipped


def write_indices(path, indices):
    """One integer a line, written atomically (the splits a run keeps in its folder; a failed write is a
    UserError naming the cause, as every file of a run folder)."""
    atomic_write_text(path, ''.join(f'{int(i)}\n' for i in indices))


def write_lines(path, lines):
    """Text lines, written atomically (the split and class lists a run keeps in its folder)."""
    atomic_write_text(path, ''.join(f'{line}\n' for line in lines))


_MD5_SEEN = {}      # (path, size, mtime, gunzip) -> md5: a file checked before its run folder is made is not read twice


def md5sum(path, chunk=1 << 20, gunzip=False):
    """The md5 of the file's bytes; gunzip=True: of the bytes the gzip file decompresses to (a damaged one
    raises gzip's OSError, EOFError or zlib.error)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, gunzip)
    if key not in _MD5_SEEN:       # hashlib, not torchvision's helper: importing torchvision costs 3-4 s a run
        digest = hashlib.md5(usedforsecurity=False)
        with (gzip.open if gunzip else open)(path, 'rb') as f:
            for block in iter(lambda: f.read(chunk), b''):
                digest.update(block)
        _MD5_SEEN[key] = digest.hexdigest()
    return _MD5_SEEN[key]


def dataset_root(root, synthetic):
    """The folder of the official files (synthetic False), of the small stand-in (True or 'small') or of the
    full-size one ('full', in <root>/synthetic-full/)."""
    if not synthetic:
        return root
    return os.path.join(root, SYNTHETIC_DIR + ('-full' if synthetic == 'full' else ''))



def _latin1_encode(text, encoding='latin1'):
    """What a Python 3 pickle of bytes calls (_codecs.encode(text, 'latin1')), for that encoding only."""
    if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
        raise pickle.UnpicklingError(f'_codecs.encode with {encoding!r}')
    return text.encode('latin1')


# The only callables a CIFAR pickle may name: a numpy array's reconstruction (numpy.core in the official
# Python 2 files, numpy._core in files numpy 2 writes) and bytes as Python 3 pickles them. Everything else
# (os.system, builtins.eval, any class) is refused before it is looked up.
_SAFE_GLOBALS = {('numpy.core.multiarray', '_reconstruct'): np.zeros(1).__reduce__()[0],
                 ('numpy._core.multiarray', '_reconstruct'): np.zeros(1).__reduce__()[0],
                 ('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
                 ('_codecs', 'encode'): _latin1_encode}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f'{module}.{name}')
        return _SAFE_GLOBALS[(module, name)]

    def persistent_load(self, pid):
        raise pickle.UnpicklingError('a persistent id')


def safe_unpickle(f, name):
    """A pickle of the types the official CIFAR files hold (dicts, lists, strings, bytes, numbers, numpy
    arrays), read with a restricted unpickler: anything that would call other code is a UserError."""
    try:
        return _DataUnpickler(f, encoding='latin1').load()
    except pickle.UnpicklingError as e:
        raise UserError(f'{name} holds a Python object other than the data CIFAR\'s files hold ({e}): refused, '
                        'since reading it could run code. Neither the official files nor the stand-in this code '
                        'writes hold one: replace the file (the stand-in: delete its folder and run again, it is '
                        'written anew; the official files: unpack the archive again, or rerun with --download).'
                        ) from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError) as e:
        raise UserError(f'{name} cannot be read as a CIFAR pickle ({type(e).__name__}: {e}): it is damaged. Replace '
                        'it (the stand-in: delete its folder and run again; the official files: unpack the archive '
                        'again, or rerun with --download).') from None
