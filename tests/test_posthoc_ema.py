"""Post-hoc EMA (EDM2 §3, App. C): the power-function maths in closed form, the tracked averages against their exact
weights, reconstruction against directly tracked averages, and the averages across a kill and resume."""

import math

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from vediff import ConfigError, EDMPrecond, ImageDataModule, PostHocEMA, UNet2D, VEDiffusion, reconstruct_ema
from vediff.training.posthoc_ema import (
    MAX_SIGMA_REL,
    gamma_of,
    posthoc_coefficients,
    power_ema_beta,
    profile_inner_product,
    read_snapshots,
    sigma_rel_of,
    snapshot_file,
    write_snapshot,
)


def test_sigma_rel_and_gamma_convert_in_closed_form():
    # EDM2's tracked lengths: σ_rel 0.05 and 0.10 are γ ≈ 16.97 and 6.94 (Karras et al. 2024, §3.2).
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.005) and gamma_of(0.10) == pytest.approx(6.94, abs=0.005)
    for sigma_rel in (0.01, 0.05, 0.075, 0.1, 0.2, 0.28):
        gamma = gamma_of(sigma_rel)
        assert sigma_rel_of(gamma) == pytest.approx(sigma_rel, rel=1e-12)
        inverse = sigma_rel**-2
        assert gamma**3 + 7 * gamma**2 + (16 - inverse) * gamma + 12 - inverse == pytest.approx(0, abs=1e-6)
    assert sigma_rel_of(0.0) == pytest.approx(MAX_SIGMA_REL)  # γ = 0: the uniform average
    for bad in (0.0, -0.1, 0.29, math.nan):
        with pytest.raises(ConfigError, match="sigma_rel"):
            gamma_of(bad)


def profile(gamma: float, t: float, tau: np.ndarray) -> np.ndarray:
    return np.where(tau <= t, (gamma + 1) * tau**gamma / t ** (gamma + 1), 0.0)


def test_profile_inner_products_are_the_integrals_of_the_profiles():
    tau = np.linspace(0, 300, 3_000_001)[1:]
    for (g_a, t_a), (g_b, t_b) in [((16.97, 100), (6.94, 300)), ((6.94, 300), (16.97, 100)), ((3.0, 200), (3.0, 200))]:
        integral = np.trapezoid(profile(g_a, t_a, tau) * profile(g_b, t_b, tau), tau)
        assert profile_inner_product(g_a, t_a, g_b, t_b) == pytest.approx(integral, rel=1e-4)
    gamma = gamma_of(0.1)
    assert profile_inner_product(gamma, 7.0, gamma, 7.0) * 7.0 == pytest.approx((gamma + 1) ** 2 / (2 * gamma + 1))


def tracked(trajectory: list[torch.Tensor], sigma_rels: list[float], batch: int) -> PostHocEMA:
    """A PostHocEMA fed a weight trajectory, one optimizer step of `batch` images per entry."""
    ema = PostHocEMA(sigma_rels=sigma_rels)
    for k, weights in enumerate(trajectory, start=1):
        ema.update([weights], k * batch)
    return ema


def test_the_tracked_average_weights_each_step_as_the_closed_form_says():
    # Over n steps of b images, step k carries (k^(γ+1) − (k−1)^(γ+1)) / n^(γ+1) of the average, whatever b.
    n, batch = 200, 64
    values = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ema = tracked([v.reshape(1).float() for v in values], [0.05, 0.1], batch)
    k = np.arange(1, n + 1, dtype=np.float64)
    for gamma, average in zip(ema.gammas, ema.averages, strict=True):
        weights = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / n ** (gamma + 1)
        assert weights.sum() == pytest.approx(1.0)
        assert average[0].item() == pytest.approx(float(weights @ values.numpy()), abs=1e-5)
    assert power_ema_beta(3.0, images=batch, batch=batch) == 0  # the first step starts the average at the weights


def tiny_denoiser() -> EDMPrecond:
    torch.manual_seed(0)
    return EDMPrecond(UNet2D(sample_size=8, in_channels=1, model_channels=8, channel_mult=[1], num_blocks=1,
                             attn_resolutions=[], dropout=0.0))


def synthetic_run(tmp_path, steps: int = 400, batch: int = 16, every: int = 20):
    """A smooth, noisy weight trajectory of a tiny denoiser's parameters, tracked at σ_rel 0.05 and 0.10 with a
    snapshot every `every` steps, and at 0.075 directly; returns the folder, the trajectory and the direct average."""
    denoiser = tiny_denoiser()
    shapes = [p.shape for p in denoiser.parameters()]
    generator = torch.Generator().manual_seed(1)
    amplitude, phase, drift = ([torch.randn(s, generator=generator) for s in shapes] for _ in range(3))
    sources, direct = PostHocEMA(sigma_rels=[0.05, 0.10]), PostHocEMA(sigma_rels=[0.075])
    trajectory = []
    for k in range(1, steps + 1):
        weights = [a * math.sin(k / 60) * p.cos() + d * k / steps + 0.05 * torch.randn(s, generator=generator)
                   for a, p, d, s in zip(amplitude, phase, drift, shapes, strict=True)]
        trajectory.append(weights)
        sources.update(weights, k * batch)
        direct.update(weights, k * batch)
        if k % every == 0:
            write_snapshot(snapshot_file(tmp_path / "phema", k * batch), k * batch, sources.sigma_rels,
                           sources.averages, denoiser)
    return tmp_path / "phema", trajectory, direct.averages[0], denoiser


def test_asking_for_a_tracked_profile_returns_that_snapshot(tmp_path):
    folder, *_ = synthetic_run(tmp_path, steps=100)
    snapshots = read_snapshots(folder)
    newest = snapshots[-1]
    for sigma_rel in (0.05, 0.10):
        state = reconstruct_ema(folder, sigma_rel, output="state_dict")
        middle = reconstruct_ema(folder, sigma_rel, at_kimg=snapshots[2].images / 1000, output="state_dict")
        from safetensors.torch import load_file

        for snapshot, got in ((newest, state), (snapshots[2], middle)):
            saved = load_file(str(snapshot.path))
            for name, value in got.items():
                expected = saved.get(f"{sigma_rel:.4f}/{name}", saved.get(f"buffers/{name}"))
                torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


def test_a_reconstructed_length_matches_the_directly_tracked_average(tmp_path):
    # σ_rel 0.075 from snapshots of 0.05 and 0.10, against 0.075 tracked all along. Both are linear in the
    # trajectory: reconstruction weights step k by w_rec(k) = Σ_i x_i·w_i(k), the direct average by w(k), so for each
    # weight j, |θ_rec − θ_direct| = |Σ_k (w_rec(k) − w(k))·θ_k,j| ≤ ‖w_rec − w‖₂·‖θ_·,j‖₂ (Cauchy–Schwarz): the
    # tolerance, computed exactly from the discrete weights of this run.
    steps, batch, every = 400, 16, 20
    folder, trajectory, direct, denoiser = synthetic_run(tmp_path, steps, batch, every)
    reconstructed = reconstruct_ema(folder, 0.075, output="state_dict")
    k = np.arange(1, steps + 1, dtype=np.float64)

    def discrete_weights(gamma: float, n: int) -> np.ndarray:
        weights = np.zeros(steps)
        weights[:n] = (k[:n] ** (gamma + 1) - (k[:n] - 1) ** (gamma + 1)) / n ** (gamma + 1)
        return weights

    sources = [(gamma_of(s), float(t * batch)) for t in range(every, steps + 1, every) for s in (0.05, 0.10)]
    x = posthoc_coefficients(sources, (gamma_of(0.075), float(steps * batch)))
    w_rec = sum(c * discrete_weights(g, round(t / batch)) for c, (g, t) in zip(x, sources, strict=True))
    w_direct = discrete_weights(gamma_of(0.075), steps)
    gap = float(np.linalg.norm(w_rec - w_direct))
    assert gap < 0.2 * float(np.linalg.norm(w_direct))  # the profile fit itself is close
    names = [name for name, _ in denoiser.named_parameters()]
    worst = 0.0
    for j, name in enumerate(names):
        path_norm = torch.stack([weights[j] for weights in trajectory]).double().norm(dim=0)
        bound = gap * path_norm + 1e-5
        difference = (reconstructed[name].double() - direct[j].double()).abs()
        assert bool((difference <= bound).all()), name
        worst = max(worst, float((difference / bound).max()))
    assert worst > 0.01  # the bound is not vacuous: the two differ, by up to a few percent of it


class Recorder(Callback):
    """The denoiser's raw weights after every optimizer step, as the post-hoc EMA sees them."""

    def __init__(self) -> None:
        self.trajectory: list[tuple[int, list[torch.Tensor]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.trajectory.append((pl_module.images_seen, [p.detach().clone() for p in pl_module.denoiser.parameters()]))


def fit(module, callbacks, max_epochs, root, ckpt_path=None):
    data = ImageDataModule(dataset="digits", image_size=8, batch_size=16, val_size=32)
    trainer = L.Trainer(max_epochs=max_epochs, limit_train_batches=3, logger=False, enable_checkpointing=False,
                        default_root_dir=root,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def test_the_averages_go_on_unchanged_across_a_stop_and_resume(tmp_path):
    net = dict(sample_size=8, in_channels=1, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[],
               dropout=0.0)
    first, recorded = PostHocEMA(sigma_rels=[0.05, 0.10]), Recorder()
    trainer = fit(VEDiffusion(UNet2D(**net), warmup_kimg=0), [first, recorded], max_epochs=2, root=tmp_path)
    trainer.save_checkpoint(tmp_path / "stopped.ckpt")
    resumed, recorded_after = PostHocEMA(sigma_rels=[0.05, 0.10]), Recorder()
    fit(VEDiffusion(UNet2D(**net), warmup_kimg=0), [resumed, recorded_after], max_epochs=4, root=tmp_path,
        ckpt_path=tmp_path / "stopped.ckpt")
    # Each run ended with a snapshot of its averages, in the trainer's folder (no logger here).
    assert [p.name for p in (tmp_path / "phema").iterdir()] == ["phema-000000000096.safetensors",
                                                                "phema-000000000192.safetensors"]
    # One average fed the whole trajectory, both runs' steps in order, is the resumed run's average to the bit.
    trajectory = recorded.trajectory + recorded_after.trajectory
    assert [images for images, _ in trajectory] == [16 * k for k in range(1, 13)]
    replay = PostHocEMA(sigma_rels=[0.05, 0.10])
    for images, weights in trajectory:
        replay.update(weights, images)
    for ours, expected in zip(resumed.averages, replay.averages, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, expected, strict=True))
    # A restarted average would equal the resumed run's first weights: it does not.
    assert not torch.equal(resumed.averages[1][0], recorded_after.trajectory[-1][1][0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(sigma_rels=[0.3]), r"post_hoc_ema\.sigma_rels\.0: 0\.3 must be below 0\.2887"),
    (dict(sigma_rels=[0.05, 0.0]), r"post_hoc_ema\.sigma_rels\.1: 0\.0 must be above 0"),
    (dict(sigma_rels=[0.1, 0.1]), "repeats a value"),
    (dict(snapshot_kimg=0), "post_hoc_ema.snapshot_kimg: 0 must be above 0"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PostHocEMA(**kwargs)
