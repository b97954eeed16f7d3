"""The machinery below the five method scripts and the commands: the command line and its errors
(options), checkpoints and atomic files (checkpoints), devices and several processes (distributed), the
fast paths (fast_paths), the networks (models), the file-streamed large datasets (large_datasets), and the
experiments reproduce.py runs (experiments). No file here names a method's hyperparameters; the scripts
at the top import from here.
"""
