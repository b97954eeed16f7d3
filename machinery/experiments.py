"""The papers' experiments as data: what reproduce.py runs, and the tables results.py makes of their runs.

  EXPERIMENTS                   every experiment: its settings (each a script's own command line), default
                                seeds, --quick flags, the paper's table (rows x columns -> setting and
                                metrics column), the paper's numbers where they could be read
  setting_flags, gpus_of, ...   a setting's command line and GPUs; run_state: a run folder's state

Used by reproduce.py (the runs), results.py (an experiment's table and figure: experiment_report) and
benchmarks/project.py (an experiment's projected hours). Adding an experiment is one entry of EXPERIMENTS
(see its comment). Plain Python: a submitit job imports reproduce.py, and so this file, and needs neither
torch nor the scripts.
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # the repository
NOT_PUBLISHED = 'not published in readable form'
FINISHED = 'finished.json'       # in each run folder: written when the script exited with code 0

# ----------------------------------------------------------------------------------------------------
# The experiments
# ----------------------------------------------------------------------------------------------------

LEVEL_CLASSES = [3, 10, 20, 100]                          # 4-level CIFAR-100
PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # MAXL's Figure 3: (primary level, auxiliary level)
AUX_METHODS = {'Random': 'random', 'K-means': 'kmeans', 'Human': 'human', 'MAXL': 'maxl'}
PSIS = [2, 5, 10, 20, 50, 100]          # MAXL's first version, Figure 4: auxiliary classes per primary class
# maxl-datasets: every dataset the MAXL scripts read (--dataset), its name in the table and its flags: those held on
# the device train the paper's VGG-16 (CIFAR-100 with its hierarchy's psi), the file-streamed ones torchvision's
# ResNet-18 (the scripts' default there) at 224 pixels, tiny-ImageNet at its own 64
MAXL_DATASETS = {'cifar100': ('CIFAR-100 (20 coarse classes), VGG-16', []),
                 'cifar10': ('CIFAR-10, VGG-16', ['--psi', '5']), 'svhn': ('SVHN, VGG-16', ['--psi', '5']),
                 'fashion-mnist': ('Fashion-MNIST, VGG-16', ['--psi', '5']),
                 'tiny-imagenet': ('tiny-ImageNet (64 px), ResNet-18', ['--psi', '5', '--image_size', '64']),
                 'cub200': ('CUB-200, ResNet-18', ['--psi', '5']), 'indoor': ('MIT-67, ResNet-18', ['--psi', '5']),
                 'dogs': ('Stanford Dogs, ResNet-18', ['--psi', '5']),
                 'imagenet100': ('ImageNet-100 (100 classes drawn with the seed), ResNet-18', ['--psi', '5'])}
# --quick on the file datasets' stand-ins (6 to 10 classes of 20 training and 4 test JPEGs): 64-pixel crops, no
# worker processes, batches of 20; ImageNet's stand-in has 10 classes, so imagenet100 becomes imagenet10
QUICK_FILES = ['--image_size', '64', '--workers', '0', '--batch_size', '20']
CIFARS = {'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100'}
SLA_AUGS = ['rotation', 'color_perm']
SEMI = {'svhn': ('SVHN', '1000', ['--alpha', '0.1'], '5e-5'),   # the original's run.sh
        'cifar10': ('CIFAR-10', '4000', ['--alpha', '1.0'], '1e-4'),
        'cifar100': ('CIFAR-100', '10000', ['--alpha', '1.0'], '1e-4')}
# setting suffix: (flags, the table's column, the method as train_meta_semi.reported() names it)
SEMI_METHODS = {'baseline': (['--baseline'], 'Baseline', 'labeled only (baseline)'),
                'baseline-mixup': (['--baseline', '--mix-up'], 'Baseline + mixup', 'mixup baseline'),
                'meta': ([], 'MetaSemi', 'MetaSemi'),
                'meta-mixup': (['--mix-up'], 'MetaSemi + mixup', 'MetaSemi + mixup')}

# The MetaSemi papers' test errors, %: ConvLarge, 400,000 steps, the labels of SEMI; ImageNet with 10 % labels,
# ResNet-18, as (top-1, top-5). {method: {(dataset, labels or label fraction): (error, source)}}. The paper gives
# MetaSemi + mixup; the authors' slides the ablation and ImageNet's labeled-only number. That the slides' "no
# meta" rows are the labeled-only baseline with and without mixup is an inference from the original's
# train_baseline.py (labeled data only, plain cross-entropy; with --mix-up, labeled images mixed with unlabeled
# ones and the network's own predictions; no meta step), the script these runs' --baseline follows.
METASEMI_SOURCES = {
    'paper': 'the MetaSemi paper, arXiv 2007.03966',
    'slides': "the MetaSemi authors' slides, images/ (brief-slides.pdf, full-slides.pdf) of "
              'github.com/Sakura03/SemiMeta; that their "no meta" rows (no meta, no mixup; mixup only) are the '
              "labeled-only baseline without and with mixup is an inference from the original's train_baseline.py",
}
METASEMI_ERROR = {
    'labeled only (baseline)': {('svhn', 1000): (9.76, 'slides'), ('cifar10', 4000): (15.43, 'slides'),
                                ('cifar100', 10000): (38.74, 'slides'), ('imagenet', 0.1): ((53.65, 31.01), 'slides')},
    'mixup baseline': {('svhn', 1000): (5.60, 'slides'), ('cifar10', 4000): (11.10, 'slides'),
                       ('cifar100', 10000): (32.67, 'slides')},
    'MetaSemi': {('svhn', 1000): (3.68, 'slides'), ('cifar10', 4000): (11.63, 'slides'),
                 ('cifar100', 10000): (35.40, 'slides')},
    'MetaSemi + mixup': {('svhn', 1000): (3.15, 'paper'), ('cifar10', 4000): (7.78, 'paper'),
                         ('cifar100', 10000): (30.74, 'paper'), ('imagenet', 0.1): ((44.87, 18.88), 'paper')},
}
# SLA on long-tailed CIFAR, known only second-hand: {(dataset, imbalance ratio): test accuracy, %}
SLA_LT_SOURCES = {'Chu et al.': 'second-hand: Chu et al., ECCV 2020, arXiv 2008.03673, Tables 1-2, row "SLA" (from SLA\'s '
                                'first arXiv version); which SLA inference, the backbone, the loss and how the number '
                                'was selected are not stated there'}
SLA_LT = {('cifar10', 10): 89.58, ('cifar10', 100): 80.24, ('cifar100', 10): 59.89, ('cifar100', 100): 45.53}

# --quick appends these flags to a setting's own (argparse keeps a flag's last value): per script, and per
# setting where the setting's own value does not fit the stand-in, whose sizes are QUICK_SIZES.
QUICK_MAXL = {'model_vgg_single.py': ['--synthetic', '--epochs', '3', '--width', '0.0625'],
              'model_vgg_human.py': ['--synthetic', '--epochs', '3', '--width', '0.0625',
                                     '--ae_epochs', '1', '--ae_width', '8', '--kmeans_n_init', '1'],   # K-means reads ae_*
              'model_vgg_maxl.py': ['--synthetic', '--epochs', '3', '--width', '0.0625']}
QUICK_SLA = ['--synthetic', '--model', 'cresnet20', '--width', '0.25', '--batchsize', '32', '--num-iterations', '120',
             '--val-freq', '40']
QUICK_SEMI = ['--synthetic', '--width', '0.125', '--batch-size', '32', '--total-steps', '150', '--warmup', '20',
              '--test-freq', '50']
QUICK_SEMI_LABELS = {'svhn': '100', 'cifar10': '100', 'cifar100': '500'}      # of the stand-in's 1,000 images
QUICK_SIZES = {'cifar100': (1000, 500), 'cifar10': (1000, 500), 'svhn': (1000, 500), 'fashion-mnist': (1000, 500)}   # (train, test) images
QUICK_DATA_ROOT = os.path.join('dataset', 'quick')        # --quick's data root unless --data_root is given


def pair_name(p, a):
    return f'{LEVEL_CLASSES[p]} / {LEVEL_CLASSES[a]} classes (levels {p}, {a})'


# Fashion-MNIST on a 2-core CPU: the papers' recipes, narrowed (VGG-16 at width 1/8 on 1,000 training images a
# class, ResNet-20 and ConvLarge at width 1/4, batches of 64) and shortened by one rule fixed before any run:
# each paper's table gets at most 2 core-hours for its 3 seeds (6 core-hours: 3 hours with --jobs 2), its
# budget the largest round number that fits, the papers' schedule shapes kept (MAXL halves its rates at 1/4,
# 2/4 and 3/4 of the epochs; SLA x0.1 at 1/2 and 3/4 of the iterations; MetaSemi x0.1 at 3/4 and 7/8 of the
# steps after a 1 % warm-up). The budgets come from a timing pilot on the real files that read no accuracy:
# CPU seconds, one thread, of one epoch of each MAXL setting (Single 13, Random 12.5, MAXL second order 52,
# first order 46; K-means' autoencoder and clustering 204 once) and of 100 steps with one evaluation of each
# SLA (Baseline 10, DA 55, MT 54, SLA 62, SLA+SD 68) and MetaSemi setting (labeled only 55, + mixup 62,
# MetaSemi 126, + mixup 114): 16 epochs (2.0 core-hours), 900 iterations (1.9) and 600 steps (1.8).
FMNIST_MAXL = ['--width', '0.125', '--epochs', '16', '--lr_step', '4', '--num_samples_per_class', '1000']
FMNIST_MAXL_METHODS = {'single': ('model_vgg_single.py', []),
                       'random': ('model_vgg_human.py', ['--aux_labels', 'random', '--psi', '5']),
                       'kmeans': ('model_vgg_human.py', ['--aux_labels', 'kmeans', '--psi', '5']),
                       'maxl2': ('model_vgg_maxl.py', ['--psi', '5', '--meta_order', '2']),
                       'maxl1': ('model_vgg_maxl.py', ['--psi', '5', '--meta_order', '1'])}
FMNIST_SLA = ['--model', 'cresnet20', '--width', '0.25', '--batchsize', '64', '--num-iterations', '900',
              '--val-freq', '150']
FMNIST_SEMI = ['--num-label', '1000', '-a', 'convlarge', '--width', '0.25', '--batch-size', '64', '--total-steps', '600',
               '--warmup', '6', '--milestones', '450,525', '--test-freq', '100', '--weight-decay', '1e-4']
FMNIST_SEMI_METHODS = {'baseline': ['--baseline'], 'baseline-mixup': ['--baseline', '--mix-up', '--alpha', '1.0'],
                       'meta': [], 'meta-mixup': ['--mix-up', '--alpha', '1.0']}

# Each experiment: title; seeds (default); settings {name: [script, its flags...]}; table {row: {column:
# (setting, metrics column)}} (test_acc, test_single_acc, test_agg_acc as results.py reports them; test_acc5:
# top-5 at the best top-1); measure (accuracy or error, in %); paper {(row, column): the paper's number};
# gpus (per run; an int or {setting: int}, default 1); quick {script or setting: flags}; figure (a PNG name:
# MAXL's Figure 3); curves (a PNG name: each table's test curves, mean ± std over the seeds). A table's claims:
# (method, its comparison, the paper's claim of the method against it), reported as the per-seed gain.
EXPERIMENTS = {
    'maxl-fig3': dict(
        title='MAXL (NeurIPS 2019), Figure 3: Single, Random, K-means, Human and MAXL on the six (primary, '
              'auxiliary) level pairs of 4-level CIFAR-100; VGG-16, 200 epochs; primary-task test accuracy',
        seeds=[0, 1, 2],
        settings={
            **{f'single-p{p}': ['model_vgg_single.py', '--primary_level', f'{p}'] for p in (0, 1, 2)},
            **{f'{m}-p{p}-a{a}': ['model_vgg_human.py', '--primary_level', f'{p}', '--aux_level', f'{a}',
                                  '--aux_labels', m] for p, a in PAIRS for m in ('random', 'kmeans', 'human')},
            **{f'maxl-p{p}-a{a}': ['model_vgg_maxl.py', '--primary_level', f'{p}', '--aux_level', f'{a}']
               for p, a in PAIRS},
        },
        table={pair_name(p, a): {'Single': (f'single-p{p}', 'test_acc'),
                                 **{m: (f'{key}-p{p}-a{a}', 'test_acc') for m, key in AUX_METHODS.items()}}
               for p, a in PAIRS},
        measure='accuracy',
        paper={},                    # Figure 3 is learning curves: no number of it could be read
        selection="the paper's: none to compare (Figure 3 is curves); its first version reports each point as "
                  'the mean test accuracy of the last 5 of 200 epochs, the headline here. The best test accuracy, '
                  'selected on the test set, is in the second table only.',
        also=[('best', 'The same cells, the best test accuracy over all epochs: selected on the test set (optimistic, '
                       'not the headline)')],
        figure='figure3.png',
        quick=QUICK_MAXL,
    ),
    'maxl-psi': dict(
        title='MAXL\'s first version (its ICLR 2019 submission), Figure 4 as published: MAXL on CIFAR-10 with psi = '
              '2, 5, 10, 20, 50 and 100 auxiliary classes per primary class, with the entropy term (weight 0.2) and '
              'without it (weight 0), Single beside them; VGG-16, 200 epochs; each point the mean test accuracy of '
              'the last 5 epochs, as that version reports it (its CIFAR-10.1v6 panel is not reproduced: the data is '
              'not read here)',
        seeds=[0, 1, 2],
        settings={'single': ['model_vgg_single.py', '--dataset', 'cifar10'],
                  **{f'maxl-psi{n}': ['model_vgg_maxl.py', '--dataset', 'cifar10', '--psi', f'{n}'] for n in PSIS},
                  **{f'maxl-psi{n}-noentropy': ['model_vgg_maxl.py', '--dataset', 'cifar10', '--psi', f'{n}',
                                                '--entropy_weight', '0'] for n in PSIS}},
        tables=[dict(title='CIFAR-10, the mean test accuracy of the last 5 epochs', measure='accuracy', paper={},
                     table={f'psi {n} ({10 * n} auxiliary classes)': {
                         'MAXL, with the entropy term': (f'maxl-psi{n}', 'test_acc'),
                         'MAXL, without it': (f'maxl-psi{n}-noentropy', 'test_acc'),
                         'Single': ('single', 'test_acc')} for n in PSIS})],
        quick={script: flags + ['--epochs', '5'] for script, flags in QUICK_MAXL.items()},   # 5 epochs: a last 5
    ),
    'maxl-datasets': dict(
        title='MAXL (NeurIPS 2019) over the 9 datasets this repository loads: Single, Random, K-means, MAXL (second '
              'order), and Human where a hierarchy gives its labels (CIFAR-100); psi = 5 auxiliary classes per '
              'primary class; VGG-16 on the 32-pixel datasets, ResNet-18 on the file-streamed ones; 200 epochs; '
              'primary-task test accuracy. The paper\'s Table 1 covers 7 datasets whose list could not be read '
              'here: these are this repository\'s datasets, not the paper\'s',
        seeds=[0, 1, 2],
        settings={
            **{f'{d}-single': ['model_vgg_single.py', '--dataset', d, *flags[2:]]
               for d, (_, flags) in MAXL_DATASETS.items()},
            **{f'{d}-{m}': ['model_vgg_human.py', '--dataset', d, '--aux_labels', m, *flags]
               for d, (_, flags) in MAXL_DATASETS.items() for m in ('random', 'kmeans')},
            'cifar100-human': ['model_vgg_human.py', '--dataset', 'cifar100', '--aux_labels', 'human'],
            **{f'{d}-maxl': ['model_vgg_maxl.py', '--dataset', d, *flags] for d, (_, flags) in MAXL_DATASETS.items()},
        },
        tables=[dict(title='This repository\'s datasets (the paper\'s 7 are not known here), psi 5',
                     measure='accuracy', paper={},
                     table={name: {'Single': (f'{d}-single', 'test_acc'), 'Random': (f'{d}-random', 'test_acc'),
                                   'K-means': (f'{d}-kmeans', 'test_acc'),
                                   **({'Human': ('cifar100-human', 'test_acc')} if d == 'cifar100' else {}),
                                   'MAXL': (f'{d}-maxl', 'test_acc')}
                            for d, (name, _) in MAXL_DATASETS.items()})],
        quick={**QUICK_MAXL,
               **{f'{d}-{m}': QUICK_FILES + (['--dataset', 'imagenet10'] if d == 'imagenet100' else [])
                  for d in list(MAXL_DATASETS)[4:] for m in ('single', 'random', 'kmeans', 'maxl')}},
    ),
    'sla-cifar': dict(
        title='SLA (ICML 2020), its CIFAR table: Baseline, DA, MT, SLA+SI and SLA+AG (both read from the sla runs), '
              'SLA+SD; rotation and colour permutation; CIFAR-10 and CIFAR-100; ResNet-32, 80,000 iterations; test '
              'accuracy at the best validation single accuracy',
        seeds=[0, 1, 2],
        settings={
            **{f'{d}-baseline': ['train_sla.py', '--dataset', d, '--model', 'cresnet32', '--mode', 'baseline']
               for d in CIFARS},
            **{f'{d}-{mode}-{aug}': ['train_sla.py', '--dataset', d, '--model', 'cresnet32', '--mode', mode,
                                     '--aug', aug]
               for d in CIFARS for aug in SLA_AUGS for mode in ('da', 'mt', 'sla', 'sla+sd')},
        },
        table={f'{name}, {aug}': {'Baseline': (f'{d}-baseline', 'test_single_acc'),
                                  'DA': (f'{d}-da-{aug}', 'test_single_acc'),
                                  'MT': (f'{d}-mt-{aug}', 'test_single_acc'),
                                  'SLA+SI': (f'{d}-sla-{aug}', 'test_single_acc'),
                                  'SLA+AG': (f'{d}-sla-{aug}', 'test_agg_acc'),
                                  'SLA+SD': (f'{d}-sla+sd-{aug}', 'test_single_acc')}
               for d, name in CIFARS.items() for aug in SLA_AUGS},
        measure='accuracy',
        paper={},
        selection="ours: the test accuracy at the best validation single accuracy (5,000 of the 50,000 training "
                  "images held out), as the paper and the original code select; the paper's numbers could not be "
                  'read here.',
        quick={'train_sla.py': QUICK_SLA},
    ),
    'sla-imbalanced': dict(
        title='SLA (ICML 2020) on long-tailed CIFAR: train_sla.py --imbalance_ratio R, R = 100 and 10 (the common '
              "CIFAR-LT: Cui et al.'s exponential profile over the full 50,000 training images, the balanced test set; "
              "the paper's own long-tailed protocol could not be read); Baseline, SLA+SI, SLA+AG, SLA+SD; rotation; "
              'ResNet-32, 80,000 iterations',
        seeds=[0, 1, 2],
        settings={f'{d}-r{r}-{mode}': ['train_sla.py', '--dataset', d, '--model', 'cresnet32', '--mode', mode,
                                       *(['--aug', 'rotation'] if mode != 'baseline' else []),
                                       '--imbalance_ratio', f'{r}']
                  for d in CIFARS for r in (100, 10) for mode in ('baseline', 'sla', 'sla+sd')},
        table={f'{name}, R = {r}': {'Baseline': (f'{d}-r{r}-baseline', 'test_single_acc'),
                                    'SLA+SI': (f'{d}-r{r}-sla', 'test_single_acc'),
                                    'SLA+AG': (f'{d}-r{r}-sla', 'test_agg_acc'),
                                    'SLA+SD': (f'{d}-r{r}-sla+sd', 'test_single_acc')}
               for d, name in CIFARS.items() for r in (100, 10)},
        measure='accuracy',
        paper={(f'{name}, R = {r}', 'SLA (inference not stated)'): (f'{SLA_LT[(d, r)]:.2f} %', 'Chu et al.')
               for d, name in CIFARS.items() for r in (100, 10)},
        sources=SLA_LT_SOURCES,
        selection='ours: the test accuracy at the best validation single accuracy, the validation images taken from '
                  'the training images the long tail leaves unused (so the tail is the standard one); the '
                  "second-hand numbers' selection is not stated.",
        # R = 100 would leave the last CIFAR-100 class no image of a small stand-in: the full-size one
        quick={'train_sla.py': QUICK_SLA + ['--synthetic_size', 'full', '--val-freq', '60']},
    ),
    'metasemi-table': dict(
        title='MetaSemi (AISTATS 2021), its table and its slides\' ablation: SVHN 1,000, CIFAR-10 4,000 and CIFAR-100 '
              '10,000 labels; the labeled-only baseline, the baseline with mixup, MetaSemi without and with mixup; '
              'ConvLarge, 400,000 steps; best test error',
        seeds=[0, 1, 2],
        settings={f'{d}-{method}': ['train_meta_semi.py', '--dataset', d, '--num-label', labels, '-a', 'convlarge',
                                    *flags, *(mixup if '--mix-up' in flags else []), '--weight-decay', wd]
                  for d, (_, labels, mixup, wd) in SEMI.items() for method, (flags, _, _) in SEMI_METHODS.items()},
        table={f'{name}, {int(labels):,} labels': {column: (f'{d}-{method}', 'test_acc')
                                                   for method, (_, column, _) in SEMI_METHODS.items()}
               for d, (name, labels, _, _) in SEMI.items()},
        measure='error',
        paper={(f'{name}, {int(labels):,} labels', column): (f'{error:.2f} %', source)
               for d, (name, labels, _, _) in SEMI.items() for _, column, method in SEMI_METHODS.values()
               for error, source in [METASEMI_ERROR[method][(d, int(labels))]]},
        sources=METASEMI_SOURCES,
        selection="ours and the papers': the best test error over the run's tests, as the original code logs it "
                  '(selected on the test set); the final test error is in the second table.',
        also=[('final', 'The same cells, the test error of the last test (no selection)')],
        quick_rows={f'{name}, {int(labels):,} labels': f'{name}, {int(QUICK_SEMI_LABELS[d]):,} labels (--quick)'
                    for d, (name, labels, _, _) in SEMI.items()},
        quick={'train_meta_semi.py': QUICK_SEMI,
               **{f'{d}-{method}': ['--num-label', QUICK_SEMI_LABELS[d]] for d in SEMI for method in SEMI_METHODS}},
    ),
    'metasemi-imagenet': dict(
        title='MetaSemi (AISTATS 2021) on ImageNet with 10 % labels, ResNet-18, 600 epochs: MetaSemi on 8 GPUs '
              '(64 + 64 images each), the labeled-only baseline on 4 (128 each); needs ImageNet (--data_root)',
        seeds=[0],
        settings={'meta': ['train_meta_semi.py', '--dataset', 'imagenet', '-a', 'resnet18', '--batch-size', '64',
                           '--alpha', '1.0'],
                  'baseline': ['train_meta_semi.py', '--dataset', 'imagenet', '--baseline', '-a', 'resnet18',
                               '--batch-size', '128']},
        gpus={'meta': 8, 'baseline': 4},
        table={'Labeled-only baseline': {'top-1 error': ('baseline', 'test_acc'), 'top-5 error': ('baseline', 'test_acc5')},
               'MetaSemi + mixup': {'top-1 error': ('meta', 'test_acc'), 'top-5 error': ('meta', 'test_acc5')}},
        measure='error',
        paper={(row, f'top-{k} error'): (f'{errors[i]:.2f} %', source)
               for row, method in (('Labeled-only baseline', 'labeled only (baseline)'), ('MetaSemi + mixup', 'MetaSemi + mixup'))
               for errors, source in [METASEMI_ERROR[method][('imagenet', 0.1)]] for i, k in enumerate((1, 5))},
        sources=METASEMI_SOURCES,
        selection="ours and the papers': the best top-1 test error over the run's tests (top-5 at that test), as the "
                  'original code logs it (selected on the test set); the final test errors are in the second table.',
        also=[('final', 'The same cells, the test errors of the last test (no selection)')],
        quick={'train_meta_semi.py': ['--synthetic', '--image-size', '32', '--width', '0.125', '--batch-size', '8',
                                      '--epochs', '3', '--warmup-epochs', '1', '--workers', '1']},
    ),
    'sla-imagenet': dict(
        title='SLA (ICML 2020) on ImageNet, ResNet-18, rotation, 900,000 iterations of 128 images (8 GPUs x 16): '
              "the backbone and budget of the original train.py's first public defaults (--dataset imagenet --model "
              "resnet18 --batchsize 128 --num-iterations 900000 --val-freq 10000; the paper's own ImageNet backbone "
              "could not be read here); Baseline, SLA+SI, SLA+AG, SLA+SD (with --with-large-loss, the original "
              "README's advice); needs ImageNet (--data_root)",
        seeds=[0],
        settings={'baseline': ['train_sla.py', '--dataset', 'imagenet', '--model', 'resnet18', '--batchsize', '16',
                               '--mode', 'baseline'],
                  **{mode: ['train_sla.py', '--dataset', 'imagenet', '--model', 'resnet18', '--batchsize', '16',
                            '--mode', mode, '--aug', 'rotation', '--with-large-loss'] for mode in ('sla', 'sla+sd')}},
        gpus=8,
        table={'ImageNet, rotation': {'Baseline': ('baseline', 'test_single_acc'), 'SLA+SI': ('sla', 'test_single_acc'),
                                      'SLA+AG': ('sla', 'test_agg_acc'), 'SLA+SD': ('sla+sd', 'test_single_acc')}},
        measure='accuracy',
        paper={},
        selection='ours: ImageNet has no validation split here, so the test accuracy at the best test single '
                  'accuracy (selected on the test set); the final test accuracy is in the second table.',
        also=[('final', 'The same cells, the test accuracy of the last evaluation (no selection)')],
        quick={'train_sla.py': ['--synthetic', '--image-size', '32', '--width', '0.125', '--batchsize', '16',
                                '--num-iterations', '40', '--val-freq', '20', '--workers', '1']},
    ),
    'fashion-mnist': dict(
        title='The three papers\' comparisons on real images, Fashion-MNIST (60,000 training and 10,000 test images, 10 '
              'classes), sized for a 2-core CPU (about 3 hours with --jobs 2): MAXL (Single, Random, K-means, MAXL '
              'second and first order; VGG-16 at width 1/8, 16 epochs on 1,000 training images a class), SLA (Baseline, '
              'DA, MT, SLA+SI, SLA+AG, SLA+SD with rotations; ResNet-20 at width 1/4, 900 iterations of 64), MetaSemi '
              '(1,000 labels; labeled only, + mixup, MetaSemi, MetaSemi + mixup; ConvLarge at width 1/4, 600 steps of '
              '64 + 64); needs the real files (--data_root, e.g. /usr/share/datasets/fashion-mnist)',
        seeds=[0, 1, 2],
        settings={
            **{f'maxl-{name}': [script, '--dataset', 'fashion-mnist', *flags, *FMNIST_MAXL]
               for name, (script, flags) in FMNIST_MAXL_METHODS.items()},
            **{f'sla-{mode}': ['train_sla.py', '--dataset', 'fashion-mnist', '--mode', mode,
                               *(['--aug', 'rotation'] if mode != 'baseline' else []), *FMNIST_SLA]
               for mode in ('baseline', 'da', 'mt', 'sla', 'sla+sd')},
            **{f'semi-{name}': ['train_meta_semi.py', '--dataset', 'fashion-mnist', *flags, *FMNIST_SEMI]
               for name, flags in FMNIST_SEMI_METHODS.items()},
        },
        tables=[
            dict(title='MAXL (NeurIPS 2019) on Fashion-MNIST', measure='accuracy', paper={},
                 selection="the paper's first version's: the mean test accuracy of the last 5 epochs; the best test "
                           'accuracy, selected on the test set, in the second table only',
                 also=[('best', 'MAXL on Fashion-MNIST, the best test accuracy over all epochs: selected on the test '
                                'set (optimistic, not the headline)')],
                 claims=[('MAXL, second order', 'Single', 'above'), ('MAXL, first order', 'Single', 'above'),
                         ('MAXL, second order', 'Random', 'above'), ('MAXL, second order', 'K-means', 'close to or above')],
                 table={'Fashion-MNIST, psi 5 per class': {
                     'Single': ('maxl-single', 'test_acc'), 'Random': ('maxl-random', 'test_acc'),
                     'K-means': ('maxl-kmeans', 'test_acc'), 'MAXL, second order': ('maxl-maxl2', 'test_acc'),
                     'MAXL, first order': ('maxl-maxl1', 'test_acc')}}),
            dict(title='SLA (ICML 2020) on Fashion-MNIST, rotations', measure='accuracy', paper={},
                 selection="the paper's and the original code's: the test accuracy at the best validation single "
                           'accuracy (5,000 of the 60,000 training images held out)',
                 claims=[('SLA+AG', 'Baseline', 'above'), ('SLA+AG', 'DA', 'above'), ('SLA+SD', 'Baseline', 'above'),
                         ('SLA+SD', 'DA', 'above')],
                 table={'Fashion-MNIST, rotation': {
                     'Baseline': ('sla-baseline', 'test_single_acc'), 'DA': ('sla-da', 'test_single_acc'),
                     'MT': ('sla-mt', 'test_single_acc'), 'SLA+SI': ('sla-sla', 'test_single_acc'),
                     'SLA+AG': ('sla-sla', 'test_agg_acc'), 'SLA+SD': ('sla-sla+sd', 'test_single_acc')}}),
            dict(title='MetaSemi (AISTATS 2021) on Fashion-MNIST, 1,000 labels', measure='error', paper={},
                 selection="the original code's: the best test error over the run's tests (selected on the test set); "
                           'the final test error in the second table',
                 also=[('final', 'MetaSemi on Fashion-MNIST, the test error of the last test (no selection)')],
                 quick_rows={'Fashion-MNIST, 1,000 labels': 'Fashion-MNIST stand-in, 100 labels (--quick)'},
                 claims=[('MetaSemi', 'Labeled only', 'below'), ('MetaSemi + mixup', 'MetaSemi', 'below'),
                         ('MetaSemi + mixup', '+ mixup', 'below')],
                 table={'Fashion-MNIST, 1,000 labels': {
                     'Labeled only': ('semi-baseline', 'test_acc'), '+ mixup': ('semi-baseline-mixup', 'test_acc'),
                     'MetaSemi': ('semi-meta', 'test_acc'), 'MetaSemi + mixup': ('semi-meta-mixup', 'test_acc')}}),
        ],
        quick={'model_vgg_single.py': ['--synthetic', '--epochs', '3', '--num_samples_per_class', '100'],
               'model_vgg_human.py': ['--synthetic', '--epochs', '3', '--num_samples_per_class', '100',
                                      '--ae_epochs', '1', '--ae_width', '8', '--kmeans_n_init', '1'],
               'model_vgg_maxl.py': ['--synthetic', '--epochs', '3', '--num_samples_per_class', '100'],
               'train_sla.py': ['--synthetic', '--num-iterations', '60', '--val-freq', '20'],
               'train_meta_semi.py': ['--synthetic', '--num-label', '100', '--total-steps', '60', '--test-freq', '20',
                                      '--warmup', '6', '--milestones', '45,52']},
        curves='curves.png',
    ),
}


# ----------------------------------------------------------------------------------------------------
# Reading a setting's command line, and a run folder's state
# ----------------------------------------------------------------------------------------------------


def flag_value(flags, name, default=None):
    """The last value of `name` in a command line (as argparse reads it), or default."""
    values = [flags[i + 1] for i, f in enumerate(flags[:-1]) if f == name]
    return values[-1] if values else default


def dataset_of(flags):
    return flag_value(flags, '--dataset', 'cifar100' if flags[0].startswith('model_vgg') else 'cifar10')


def gpus_of(experiment, setting):
    gpus = EXPERIMENTS[experiment].get('gpus', 1)
    return gpus.get(setting, 1) if isinstance(gpus, dict) else gpus


def setting_flags(experiment, setting, quick):
    """[script, flags...] of a setting, with --quick's flags appended."""
    exp = EXPERIMENTS[experiment]
    flags = list(exp['settings'][setting])
    if quick:
        flags += exp['quick'].get(flags[0], []) + exp['quick'].get(setting, [])
    return flags


def run_state(run_dir):
    """'finished' (the script exited with 0), 'resume' (a checkpoint to continue from) or 'new'."""
    if os.path.isfile(os.path.join(run_dir, FINISHED)):
        return 'finished'
    return 'resume' if os.path.isfile(os.path.join(run_dir, 'checkpoint.pt')) else 'new'


