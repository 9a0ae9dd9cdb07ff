"""Train a VE or EDM diffusion model on images.

Quick start (offline, 2 CPU cores, a few minutes; scikit-learn's bundled handwritten digits):

    python train.py fit --config digits.yaml

EDM's unconditional CIFAR-10 recipe (DDPM++, EDM preconditioning and loss; all GPUs, bf16) and its VE variant:

    python train.py fit --config cifar10.yaml
    python train.py fit --config cifar10_ve.yaml

Class-conditional (labels from the data, label dropout for classifier-free guidance; sample.py --class-labels):

    python train.py fit --config digits_cond.yaml
    python train.py fit --config cifar10_cond.yaml

A bare config name that is not a file is looked up in configs/. Any value can be overridden on the command line:

    python train.py fit --config digits.yaml --data.batch_size 64 --model.lr 2e-4 --trainer.max_epochs 50
    python train.py fit --config digits.yaml --print_config     # the full, resolved configuration
    python train.py fit --help                                  # every option, with its documentation

Resume the newest run of a config (same log folder; step, optimizer, EMA, learning rate and the position in the
epoch restored). SIGTERM and Ctrl+C save last.ckpt before exiting; checkpoints are never half-written:

    python train.py fit --config digits.yaml --ckpt_path last

Post-hoc EMA snapshots land in the run's phema/ folder (sample.py --ema-std picks the average's length afterwards).
A guide for autoguidance of the quick start (sample.py --guide; docs/training.md):

    python train.py fit --config digits_guide.yaml

Non-leaking augmentation (EDM's; the CIFAR-10 configs use p = 0.12):  --data.augment 0.12

Consistency tuning (ECT) of a trained run, for one- and two-step sampling (sample.py --sampler consistency; the
newest digits run unless --model.init_from names another checkpoint; docs/consistency.md):

    python train.py fit --config digits_ect.yaml

Evaluate the newest run's checkpoint: held-out bits/dim through the probability-flow ODE (and FID where configured):

    python train.py test --config digits.yaml --ckpt_path last

Several processes (Lightning DDP; torchrun and SLURM work too, see docs/faults.md):

    python train.py fit --config cifar10.yaml --trainer.devices 8

Watch it:  tensorboard --logdir lightning_logs   (losses, lr, kimg, images/s, and sample grids per sampler)
Sample it: python sample.py --sampler karras_ve   (add --fid for FID/KID; see sample.py --help)
Checkpoints: lightning_logs/<name>/version_<n>/checkpoints/ (last.ckpt and periodic snapshots, with EMA weights).
"""

from pathlib import Path

from vediff.cli.train import main

if __name__ == "__main__":
    main(config_dirs=[Path(__file__).resolve().parent / "configs"])
