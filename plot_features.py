"""MetaSemi's Figure 3: the features of a trained run's labeled, unlabeled and test images (the global
average pool before the classifier) embedded in 2-D and drawn as a PNG of four panels: labeled,
unlabeled and test points coloured by class, then the three splits together (unlabeled blue, test grey,
labeled red on top). The 2-D points are also saved next to the PNG (.npz).

Optional extra, never needed for training: pip install matplotlib scikit-learn (t-SNE; --method pca
needs matplotlib only).

    python plot_features.py results/svhn                                   # best.pt, t-SNE
    python plot_features.py logs/train_meta_semi/RUN --checkpoint checkpoint.pt --method pca --num-point 1000

The seed's command line (its visualization.sh) works as written: the run folder is the directory of
--checkpoint-path (or of --index-path), model_best.pth is this project's best.pt, and --save-path is the
output folder:

    python3 plot_features.py --dataset "svhn" --checkpoint-path "results/svhn/model_best.pth" \
        --index-path "results/svhn/label_indices.txt" --save-path "results/svhn/visualization" --num-point '5000'
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

import create_dataset
from machinery.distributed import pick_device
from machinery.models import semi_network
from machinery.checkpoints import load_checkpoint
from machinery.options import UserError, python_command, spellings
from machinery.splits import read_label_indices
from machinery.streams import DeviceData
from utils import run_main

# the original's class colours (10 classes); more classes use a colour map
COLOURS = ['lightcoral', 'darkgreen', 'cadetblue', 'darkorange', 'peru', 'cornflowerblue', 'khaki', 'magenta',
           'gray', 'slategrey']


def import_plotting(method):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError('the feature picture needs matplotlib: pip install matplotlib scikit-learn '
                        '(an optional extra; training does not need it).') from None
    tsne = None
    if method == 'tsne':
        try:
            from sklearn.manifold import TSNE as tsne
        except ImportError:
            raise UserError('t-SNE needs scikit-learn: pip install scikit-learn, or use --method pca.') from None
    return plt, tsne


@torch.no_grad()
def features(model, data, index, batch=500):
    out = [model.features(data.get(index[i:i + batch])[0]) for i in range(0, len(index), batch)]
    return torch.cat(out).cpu().numpy()


def embed(points, method, tsne, seed):
    if method == 'pca':
        centred = points - points.mean(0)
        return centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
    return tsne(n_components=2, init='pca', random_state=seed).fit_transform(points)


def locate(args):
    """The run folder, checkpoint file, label-indices file and PNG path named by the short form (RUN
    [--checkpoint NAME] [--out PNG]) or by the seed's flags (--checkpoint-path, --index-path, --save-path)."""
    run = args.run or os.path.dirname(args.checkpoint_path or args.index_path) or ('.' if args.checkpoint_path
                                                                                  or args.index_path else '')
    if not run:
        raise UserError(f'give the run folder ({python_command()} plot_features.py RUN) or, as the original, '
                        '--checkpoint-path RUN/model_best.pth (the run folder is the checkpoint\'s directory).')
    if args.run and args.checkpoint_path and (os.path.realpath(os.path.dirname(args.checkpoint_path) or '.')
                                              != os.path.realpath(args.run)):
        raise UserError(f'two run folders given: {args.run!r} and the directory of --checkpoint-path '
                        f'{args.checkpoint_path!r}; give one of them.')
    if args.out and args.save_path:
        raise UserError('give --out FILE.png or --save-path FOLDER, not both.')
    checkpoint = args.checkpoint_path or os.path.join(run, args.checkpoint)
    if args.checkpoint_path and not os.path.isfile(checkpoint):
        # the original's names: model_best.pth (the best model) -> best.pt, checkpoint.pth -> checkpoint.pt
        stem = os.path.splitext(os.path.basename(checkpoint))[0]
        ours = os.path.join(run, 'checkpoint.pt' if stem.startswith('checkpoint') else 'best.pt')
        if os.path.isfile(ours):
            print(f'note: {checkpoint} does not exist; using {ours} (this project saves the original\'s '
                  f'{"checkpoint.pth as checkpoint.pt" if stem.startswith("checkpoint") else "model_best.pth as best.pt"})',
                  flush=True)
            checkpoint = ours
    indices = args.index_path or os.path.join(run, 'label_indices.txt')
    paths = {'config.json': os.path.join(run, 'config.json'), 'checkpoint': checkpoint, 'label indices': indices}
    missing = [f'{k} ({v})' for k, v in paths.items() if not os.path.isfile(v)]
    if missing:
        raise UserError(f'{run!r} is not a finished train_meta_semi run folder: {", ".join(missing)} missing.')
    out = args.out or os.path.join(args.save_path or run, f'features_{args.method}.png')
    return run, checkpoint, indices, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('run', nargs='?', default='',
                   help='the run folder (its --save-path, or logs/train_meta_semi/<run>); or use --checkpoint-path')
    p.add_argument('--checkpoint', default='best.pt', help='file in the run folder: best.pt or checkpoint.pt')
    p.add_argument(*spellings('checkpoint_path'), default='', help="the original's flag: a checkpoint file in the run folder "
                   "(its directory is the run folder; model_best.pth means this project's best.pt)")
    p.add_argument(*spellings('index_path'), default='', help="the original's flag: the labeled indices file (default: "
                   "<run>/label_indices.txt; names the run folder when --checkpoint-path is not given)")
    p.add_argument(*spellings('save_path'), default='', help="the original's flag: output folder (created) for "
                   "features_<method>.png and .npz (default: the run folder)")
    p.add_argument('--dataset', default='', help="the original's flag: must be the run's dataset (checked)")
    p.add_argument(*spellings('num_point'), type=int, default=5000, help='unlabeled and test points kept (0: all); '
                   'every labeled point is kept')
    p.add_argument('--method', choices=['tsne', 'pca'], default='tsne')
    p.add_argument('--out', default='', help='PNG path (default: <run>/features_<method>.png)')
    p.add_argument(*spellings('data_root'), dest='data_path', default='', help="data root (default: the run's)")
    p.add_argument('--device', default='auto')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    run, checkpoint, indices, out = locate(args)
    with open(os.path.join(run, 'config.json')) as f:
        cfg = json.load(f)
    if cfg.get('script', 'train_meta_semi') != 'train_meta_semi':
        raise UserError(f'{run!r} is a {cfg["script"]} run; the feature picture is of train_meta_semi runs.')
    if args.dataset and args.dataset != cfg['dataset']:
        raise UserError(f'--dataset {args.dataset} does not agree with the run: {run!r} trained on '
                        f'{cfg["dataset"]} (its config.json). Drop --dataset or give that dataset\'s run.')
    plt, tsne = import_plotting(args.method)
    device = pick_device(args.device)

    train_x, train_y, test_x, test_y = create_dataset.load_both(cfg['dataset'], args.data_path or cfg['data_root'],
                                                               cfg['synthetic'] and cfg.get('synthetic_size', 'small'))
    mean, std = create_dataset.DATASETS[cfg['dataset']].normalisation
    train = DeviceData(train_x, train_y, device, mean, std)
    test = DeviceData(test_x, test_y, device, mean, std)
    labeled, unlabeled = read_label_indices(indices, len(train))
    rng = np.random.default_rng(args.seed)
    pick = lambda idx: np.sort(rng.choice(idx, args.num_point, replace=False)) if 0 < args.num_point < len(idx) else idx
    splits = {'labeled': labeled, 'unlabeled': pick(unlabeled), 'test': pick(np.arange(len(test)))}
    print(f'# data: {len(train)}, labeled: {len(labeled)}, unlabeled: {len(unlabeled)}; embedding '
          + ', '.join(f'{len(v)} {k}' for k, v in splits.items()), flush=True)

    num_classes = create_dataset.DATASETS[cfg['dataset']].num_classes
    model = semi_network(cfg['architecture'], num_classes, cfg['width']).to(device)
    saved = load_checkpoint(checkpoint, device)
    weights = saved['state'].get('model') if 'state' in saved else saved.get('model')   # ours, or the original's
    if weights is None:
        raise UserError(f'{checkpoint} holds no network weights of a train_meta_semi run (no state/model entry).')
    model.load_state_dict(weights)
    model.eval()
    feats, classes = [], []
    for name, idx in splits.items():
        data = test if name == 'test' else train
        index = torch.as_tensor(idx, device=device)
        feats.append(features(model, data, index))
        classes.append(data.labels[index].cpu().numpy())
    xy = embed(np.concatenate(feats), args.method, tsne, args.seed)
    parts = np.split(xy, np.cumsum([len(f) for f in feats])[:-1])

    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    np.savez(os.path.splitext(out)[0] + '.npz', **{k: v for k, v in zip(splits, parts)},
             **{f'{k}_class': c for k, c in zip(splits, classes)})
    colours = (np.array(COLOURS) if num_classes <= len(COLOURS)
               else plt.get_cmap('hsv')(np.linspace(0, 1, num_classes, endpoint=False)))
    fig, axes = plt.subplots(1, 4, figsize=(24, 6))
    for ax, name, pts, c in zip(axes, splits, parts, classes):
        ax.scatter(pts[:, 0], pts[:, 1], s=10, c=colours[c])
        ax.set_title(f'{name} ({len(pts)})')
    for name, colour in (('unlabeled', 'blue'), ('test', 'grey'), ('labeled', 'red')):
        pts = parts[list(splits).index(name)]
        axes[3].scatter(pts[:, 0], pts[:, 1], s=10, c=colour, label=name)
    axes[3].legend(loc='best')
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(f'wrote {out}')


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
