"""The auxiliary labels of the MAXL paper's baselines on 4-level CIFAR-100 (its Figure 3 compares Single,
Random, K-means, Human and MAXL over the six (primary, auxiliary) level pairs of the hierarchy).

Every method gives primary class i as many auxiliary classes as the hierarchy puts under i at the
auxiliary level: `hierarchy_psi` (MAXL's psi with --aux_level, the sizes of Human's groups). The methods
differ only in how an image gets its auxiliary class: Human reads the hierarchy's own label; Random and
K-means assign every training image one class of its primary class's group (`hierarchy_groups`), once per
run; the run keeps the assignment in its folder (AUX_LABELS_FILE) and a resumed run reads it back
(`kept_labels`).
"""
import os

import numpy as np

import create_dataset
from options import UserError

AUX_LABELS_FILE = 'aux_labels.txt'     # line k: the auxiliary class of training image k


# ---- the hierarchy's groups ----------------------------------------------------------------------------

def check_levels(primary_level, aux_level):
    if aux_level <= primary_level:
        raise UserError(f'aux_level {aux_level} does not refine primary_level {primary_level}: the auxiliary '
                        f'labels must be a finer level of the hierarchy (a larger level number), e.g. '
                        f'--primary_level 2 --aux_level 3.')


def hierarchy_table():
    """One row per fine class of CIFAR-100: its labels at levels 0..3 (create_dataset.cifar100_hierarchy).
    CIFAR-100 puts 5 of its 100 fine classes in each of its 20 coarse classes; which 5 differs between the
    real files and the stand-in (whose fine class f lies in coarse class f % 20), how many does not, and
    the group sizes depend only on how many."""
    fine = np.arange(create_dataset.LEVEL_CLASSES[3])
    return create_dataset.cifar100_hierarchy(fine % create_dataset.LEVEL_CLASSES[2], fine)


def hierarchy_psi(primary_level, aux_level):
    """psi[i]: how many level-`aux_level` classes the hierarchy puts under primary class i, in
    primary-class order (sum: the level's class count). (2, 3): [5] * 20; (0, 1): [5, 1, 4]."""
    check_levels(primary_level, aux_level)
    table = hierarchy_table()
    return [len(np.unique(table[table[:, primary_level] == i, aux_level]))
            for i in range(create_dataset.LEVEL_CLASSES[primary_level])]


def hierarchy_groups(labels, primary_level, aux_level):
    """groups[i]: the level-`aux_level` classes under primary class i in this data ([N, 4] labels), in
    increasing order; their sizes are checked against hierarchy_psi."""
    pairs = np.unique(labels[:, [aux_level, primary_level]], axis=0)
    if len(pairs) != len(np.unique(pairs[:, 0])):
        raise UserError(f'in this data, level {aux_level} does not refine level {primary_level} (some auxiliary '
                        f'class appears under two primary classes); pick levels of one hierarchy.')
    groups = [pairs[pairs[:, 1] == i, 0] for i in range(create_dataset.LEVEL_CLASSES[primary_level])]
    expected = hierarchy_psi(primary_level, aux_level)
    if [len(g) for g in groups] != expected:
        raise UserError(f'this training file has {[len(g) for g in groups]} level-{aux_level} classes under the '
                        f'level-{primary_level} classes, not the hierarchy\'s {expected}: some class has no '
                        'training image. Use the full training file (or a stand-in written with at least one '
                        'image of every fine class).')
    return groups


def group_class(groups, primary, slot):
    """The slot-th class of each image's primary-class group: groups[primary[k]][slot[k]]."""
    flat = np.concatenate(groups)
    start = np.cumsum([0] + [len(g) for g in groups[:-1]])
    return flat[start[primary] + slot].astype(np.int64)


# ---- Random and K-means --------------------------------------------------------------------------------

def random_labels(primary, groups, seed):
    """Random: each image's class drawn uniformly from its primary class's group, independently, with
    the seed (its own stream: the weights and data streams of the run are those of the same seed's
    Human run)."""
    rng = np.random.default_rng([seed, 7])
    sizes = np.array([len(g) for g in groups])
    return group_class(groups, primary, rng.integers(0, sizes[primary]))


def require_sklearn():
    """scikit-learn's KMeans, or a UserError saying how to install it."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise UserError('--aux_labels kmeans clusters the autoencoder features with scikit-learn, which is not '
                        'installed in this Python: pip install scikit-learn (it is in requirements.txt), then run '
                        'the same command again; the other --aux_labels (human, random) do not need it.') from None
    return KMeans


def kmeans_labels(features, primary, groups, seed, n_init):
    """K-means: inside each primary class i, the images' features ([N, d]) are clustered by k-means
    (scikit-learn, k = len(groups[i]), n_init restarts, seeded); cluster j becomes class groups[i][j]."""
    KMeans = require_sklearn()
    out = np.empty(len(primary), dtype=np.int64)
    for i, group in enumerate(groups):
        members = np.flatnonzero(primary == i)
        if len(group) == 1:
            out[members] = group[0]
            continue
        if len(members) < len(group):
            raise UserError(f'primary class {i} has {len(members)} training images, fewer than its {len(group)} '
                            'auxiliary classes: k-means cannot fill them. Use more training images.')
        km = KMeans(n_clusters=len(group), n_init=n_init, random_state=seed % 2**32)
        out[members] = group[km.fit(features[members].astype(np.float64)).labels_]
    return out


# ---- kept in the run folder -------------------------------------------------------------------------------

def read_labels(path, primary, groups):
    """An assignment written by kept_labels, checked against this training file: one class a line, each
    inside its image's primary-class group."""
    try:
        labels = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read {path} ({e}): this run keeps its auxiliary labels there; without them it '
                        'cannot continue with the same labels. Start a new run instead.') from None
    inside = len(labels) == len(primary) and all(np.isin(labels[primary == i], g).all() for i, g in enumerate(groups))
    if not inside:
        raise UserError(f'{path} does not fit this training file ({len(labels)} labels for {len(primary)} images, or '
                        'labels outside their primary class\'s group): was the data root changed? Resume with '
                        'the data the run started with, or start a new run.')
    return labels


def kept_labels(run, primary, groups, draw):
    """The run's auxiliary labels: on --resume read back from its folder (never drawn again), else
    draw() once and written there. Under torchrun the first process reads or draws them and sends them
    to the others, so every process trains on the same labels (and only one trains the autoencoder)."""
    path = os.path.join(run.dir, AUX_LABELS_FILE)
    got = None
    if run.rank == 0:
        try:
            if run.resuming:
                got = read_labels(path, primary, groups)
            else:
                got = draw()
                create_dataset.write_indices(path, got)
        except UserError as e:
            got = e
    if run.world > 1:
        import torch.distributed as dist
        box = [got]
        dist.broadcast_object_list(box, src=0)
        got = box[0]
    if isinstance(got, UserError):
        raise got
    return got
