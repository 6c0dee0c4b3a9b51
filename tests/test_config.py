import os
from pathlib import Path

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
    assert "FA_STUDY_PROFILE" in msg  # it came from the environment: say so


@pytest.mark.parametrize("bad", [123, 1.5, ["quick"], "fastest"])
def test_bad_explicit_profile_is_a_value_error(monkeypatch, bad):
    monkeypatch.delenv("FA_STUDY_PROFILE", raising=False)
    with pytest.raises(ValueError) as err:
        config.get_profile(bad)
    msg = str(err.value)
    assert msg.startswith(("profile must be", "unknown profile ")) and repr(bad) in msg
    assert all(f"'{p}'" in msg for p in config.PROFILES)
    assert "FA_STUDY_PROFILE" not in msg  # the argument was wrong, not the environment


def test_empty_profile_variable_means_default(monkeypatch):
    monkeypatch.setenv("FA_STUDY_PROFILE", "")
    assert config.get_profile() == "default"
    monkeypatch.setenv("FA_STUDY_PROFILE", " Quick ")
    assert config.get_profile() == "quick"


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
def test_cuda_requested_without_cuda_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError) as err:
        config.get_device("cuda")
    msg = str(err.value)
    assert "device 'cuda'" in msg and "CUDA is not available" in msg and "'cpu'" in msg
    assert "FA_STUDY_DEVICE" not in msg
    monkeypatch.setenv("FA_STUDY_DEVICE", "cuda:0")
    with pytest.raises(ValueError) as err:
        config.get_device()
    assert "$FA_STUDY_DEVICE" in str(err.value) and "'cuda:0'" in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_beyond_the_gpus_present_is_a_clear_error():
    assert config.get_device("cuda").type == "cuda"
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"has {n} CUDA device.*'cuda:0'"):
        config.get_device(f"cuda:{n}")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the error without MPS")
def test_mps_requested_without_mps_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError) as err:
        config.get_device("mps")
    msg = str(err.value)
    assert "device 'mps'" in msg and "MPS" in msg and "not available" in msg and "'cpu'" in msg
    monkeypatch.setenv("FA_STUDY_DEVICE", "mps")
    with pytest.raises(ValueError, match=r"\$FA_STUDY_DEVICE"):
        config.get_device()


@pytest.mark.parametrize("bad", ["tpu", "gpu0", "xla"])
def test_bad_device_variable_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv("FA_STUDY_DEVICE", bad)
    with pytest.raises(ValueError) as err:
        config.get_device()
    msg = str(err.value)
    assert "$FA_STUDY_DEVICE" in msg and repr(bad) in msg and "allowed values" in msg


def test_bad_device_argument_is_not_blamed_on_the_variable(monkeypatch):
    monkeypatch.setenv("FA_STUDY_DEVICE", "cpu")
    for bad, needle in ((123, "device must be a string or torch.device, got 123"),
                        (3.5, "got 3.5"), ("gpu0", "unknown device 'gpu0'")):
        with pytest.raises(ValueError) as err:
            config.get_device(bad)
        assert needle in str(err.value) and "FA_STUDY_DEVICE" not in str(err.value)
        assert "allowed values: 'cpu', 'cuda', 'cuda:N', 'mps'" in str(err.value)
    assert config.get_device(torch.device("cpu")) == torch.device("cpu")


# ---------------------------------------------------------------------------- locations

def test_data_roots_search_path(monkeypatch, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("FA_STUDY_DATA", os.pathsep.join([str(a), "", str(b), str(a)]))
    monkeypatch.delenv("FA_STUDY_DATA_KNOWN", raising=False)
    known = [Path(p).resolve() for p in config.KNOWN_DATA_ROOTS]
    assert known[0] == Path("/usr/share/datasets/fashion-mnist") and known[1] == Path("data").resolve()
    assert config.data_roots() == [a, b] + known  # in order, empty entries and repeats dropped
    assert config.data_roots(known=False) == [a, b]
    monkeypatch.setenv("FA_STUDY_DATA_KNOWN", "0")
    assert config.data_roots() == [a, b]
    # root= (one path, a list, or an os.pathsep string) replaces $FA_STUDY_DATA
    assert config.data_roots(b) == [b]
    assert config.data_roots([str(b), a]) == [b, a]
    assert config.data_roots(f"{b}{os.pathsep}{a}") == [b, a]
    # the compatible name: the first root
    assert config.data_dir() == a and config.data_dir(b) == b
    monkeypatch.delenv("FA_STUDY_DATA")
    assert config.data_roots() == [] and config.data_dir() == Path("data").resolve()
    for bad in (3, [a, 4], {"x": 1}):
        with pytest.raises(ValueError, match="root must be a path"):
            config.data_roots(bad)


def test_tensor_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("FA_STUDY_TENSOR_CACHE", raising=False)
    monkeypatch.setenv("FA_STUDY_CACHE", str(tmp_path / "results"))
    assert config.tensor_cache_dir() == tmp_path / "results" / "tensors"
    monkeypatch.delenv("FA_STUDY_CACHE")
    assert config.tensor_cache_dir() == Path(".fa_study_cache/tensors").resolve()
    monkeypatch.setenv("FA_STUDY_TENSOR_CACHE", str(tmp_path / "t"))
    assert config.tensor_cache_dir() == tmp_path / "t"
