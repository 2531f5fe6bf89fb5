import os

# Must be set before anything imports triton (timm and torch.compile do): kernels then run on
# CPU tensors in the interpreter, and no test can reach the network or block on a W&B login.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(params=["auto", "reference"])
def backend(request, monkeypatch):
    """The defining-property tests run on the plain-PyTorch reference itself
    (LOWPREC_BACKEND=reference) as well as on the automatic path (the C twins on the CPU). Guards
    a bug in the reference's arithmetic (e.g. rounding up with half the right probability), which
    otherwise shows only as "the twin differs" in the twin-equality tests."""
    monkeypatch.setenv("LOWPREC_BACKEND", request.param)
    return request.param


@pytest.fixture
def conf():
    """Hydra's compose API over the repository's conf/ (for tests that compose in process)."""
    from pathlib import Path

    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lowprec import config

    config.register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()
