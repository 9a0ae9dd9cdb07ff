"""Sample images from a trained vediff checkpoint.

    python sample.py --sampler karras_ve                       # newest lightning_logs/**/last.ckpt, seeds 0-63
    python sample.py --ckpt path/to/last.ckpt --sampler ddim --steps 50 --eta 0 --grid
    python sample.py --sampler score_sde_ve --steps 500 --snr 0.16 --seeds 0-999 --npz
    python sample.py --sampler karras_ve --steps 64 --s-churn 40 --s-noise 1.007 --schedule karras --rho 7
    python sample.py --devices 2 --seeds 0-49999 --npz         # seeds split over 2 processes (Lightning Fabric)
    python sample.py --ckpt cond.ckpt --class-labels 0-9 --guidance 2 --grid   # one row per class, guided
    python sample.py --ema-std 0.08 --grid                     # the run's post-hoc EMA average of length 0.08
    python sample.py --guide guide.ckpt --guidance 1.5 --grid  # autoguidance by a weaker model of the same task
    python sample.py --ckpt ect.ckpt --sampler consistency --steps 2 --grid   # a consistency-tuned model, 2 steps

Each image comes from its own seed: the same seed gives the same image whatever --batch-size. Outputs go to --outdir:
<seed>.png per image, grid.png (--grid; small images enlarged to at least --grid-min-size px, 0 for native size),
samples.npz (--npz: uint8 images as arr_0, with their seeds). Sampler settings default to the checkpoint's model (its
σ range, image size and channels); `--help` lists them all. Checkpoints are read as tensors and plain data only;
nothing in them is executed.

Every argument is checked before anything is written: a mistake is one line on stderr and exit status 2, with no
output folder left behind. An --outdir holding an earlier run is refused unless --overwrite (which replaces that run's
files). A run that fails while sampling or writing (images that come out NaN, a full disk) removes what it wrote.
Ctrl+C stops with exit status 130; the image files already written are whole.
"""

from vediff.cli.sample import main

if __name__ == "__main__":
    main()
