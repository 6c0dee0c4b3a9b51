import pytest
import torch

from fa_study import config


def test_profile_default_and_env(monkeypatch):
    monkeypatch.delenv("FA_STUDY_PROFILE", raising=False)
    assert config.get_profile() == "default"
    monkeypatch.setenv("FA_STUDY_PROFILE", "paper")
    assert config.get_profile() == "paper"
    assert config.get_profile("quick") == "quick"  # explicit beats the environment


def test_unknown_profile_lists_allowed(monkeypatch):
    monkeypatch.setenv("FA_STUDY_PROFILE", "fast")
    with pytest.raises(ValueError) as err:
        config.get_profile()
    msg = str(err.value)
    assert "'fast'" in msg and all(f"'{p}'" in msg for p in config.PROFILES)


def test_device_choice(monkeypatch):
    monkeypatch.delenv("FA_STUDY_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert config.get_device().type == expected
    assert config.get_device("cpu").type == "cpu"
    monkeypatch.setenv("FA_STUDY_DEVICE", "cpu")
    assert config.get_device().type == "cpu"
    for bad in ("tpu", "gpu0", "xla"):
        with pytest.raises(ValueError, match="allowed values"):
            config.get_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        config.get_device("cuda")


def _tiny_training_run(seed: int) -> torch.Tensor:
    g = config.seed_everything(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(64, 8, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    for _ in range(20):
        idx = torch.randperm(64)[:16]  # global RNG, seeded by seed_everything
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_seed_everything_bitwise_reproducible_on_cpu():
    a, b = _tiny_training_run(3), _tiny_training_run(3)
    assert torch.equal(a, b)
    assert not torch.equal(a, _tiny_training_run(4))


def test_seed_must_be_integer():
    with pytest.raises(ValueError, match="seed"):
        config.seed_everything(1.5)
