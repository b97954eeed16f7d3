"""The machinery below the five method scripts and the commands: the command line and its errors
(options), atomic files, md5 sums and data roots (files), checkpoints and resume (checkpoints), devices and
several processes (distributed), the fast paths (fast_paths), the networks (models), every split a run
draws (splits), the data held on the device and its batch streams (streams), the file-streamed large
datasets (large_datasets), and the experiments reproduce.py runs (experiments).

Imported by the files at the top level (utils.py, create_dataset.py, the scripts, results.py, reproduce.py,
plot_features.py) and the benchmarks; nothing here imports a file above it.
"""
